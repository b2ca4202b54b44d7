"""Stand-in for backend/args.py: options the web UI hands the loader."""

dynamic_args = {"forge_unet_storage_dtype": None, "online_lora": False}
