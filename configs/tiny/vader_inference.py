# Inference with the tiny offline preset: the real Open-Sora v1.2 structure (STDiT3 blocks, AutoencoderKL +
# temporal VAE, T5 encoder) at toy sizes with random weights, and a reward that needs no weights.
# It generates videos on a 2-core CPU in seconds with no download, with or without a trained LoRA:
#     vader infer configs/tiny/vader_inference.py --lora_ckpt_path project_dir/<run>/lora
_base_ = "vader_train.py"  # every setting of the training config (next to this file); below, what differs

is_vader_training = False
