"""Python code generated from protos/fedweights/v1/*.proto by tools/gen_proto.py (do not edit)."""
