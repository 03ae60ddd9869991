# Inference with CogVideoX-5B through diffusers (model.type='cogvideox'), with or without a trained LoRA:
#     vader infer configs/cogvideox-5b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
# Videos: num_val_runs (2) x val_batch_size (1) x processes, cycling through the prompts; a LoRA given by
# --lora_ckpt_path (our lora/ or checkpoint folder) brings its own rank and alpha.
_base_ = "vader_train.py"  # model, sizes, dtype, seed of the training config (next to this file); below, what differs

# CogVideoXPipeline's default step count, and the scheduler THUDM samples CogVideoX-5B with
# (CogVideoXDPMScheduler, with dynamic guidance): no step of inference needs gradients
scheduler = dict(num_sampling_steps=50, solver="published")
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 0 for the reward)
