"""Reading the public checkpoint formats (diffusers folders, original single files, transformers CLIP folders,
tencent-format IP-Adapters, PyTorch pickles without torch) and converting them into MLX folders."""
