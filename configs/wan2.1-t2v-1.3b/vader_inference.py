# Inference with Wan2.1-T2V-1.3B through diffusers (model.type='wan'), with or without a trained LoRA:
#     vader infer configs/wan2.1-t2v-1.3b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
# Videos: num_val_runs (2) x val_batch_size (1) x processes, cycling through the prompts; a LoRA given by
# --lora_ckpt_path (our lora/ or checkpoint folder) brings its own rank and alpha.
_base_ = "vader_train.py"  # model, sizes, dtype, seed of the training config (next to this file); below, what differs

scheduler = dict(num_sampling_steps=50, solver="published")  # WanPipeline's default steps (training: 30), UniPC as
# the Wan repos ship it (no step here needs gradients); the rest as training
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 0 for the reward)
