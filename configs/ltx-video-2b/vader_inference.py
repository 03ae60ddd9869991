# Inference with LTX-Video 2B through diffusers (model.type='ltx'), with or without a trained LoRA:
#     vader infer configs/ltx-video-2b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
# Videos: num_val_runs (2) x val_batch_size (1) x processes, cycling through the prompts; a LoRA given by
# --lora_ckpt_path (our lora/ or checkpoint folder) brings its own rank and alpha.
_base_ = "vader_train.py"  # model, sizes, dtype, seed of the training config (next to this file); below, what differs

num_frames = 161  # LTXPipeline's default length (training uses 65)
scheduler = dict(num_sampling_steps=50)  # LTXPipeline's default (training samples with 30); the rest as training
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes 'fml' for the reward)
