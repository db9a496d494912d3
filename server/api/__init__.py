"""The gRPC front end: protobuf <-> engine conversion, auth, the Inference service, the server process."""
