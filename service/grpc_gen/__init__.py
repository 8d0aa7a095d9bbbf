"""Generated gRPC code (scripts/gen_proto.py); the protos are in service/proto/."""
