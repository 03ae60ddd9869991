# Inference with Wan2.1-I2V-14B-480P through diffusers (model.type='wan'), with or without a trained LoRA; every
# prompt needs its first frame in the prompts file:
#     vader infer configs/wan2.1-i2v-14b-480p/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
# Sampled as Wan2.1 samples I2V: 40 steps of UniPC (scheduler.solver='published', flow_shift 3.0 at 480P).
_base_ = "vader_train.py"  # model, sizes, guidance, shift, dtype, seed of the training config; below, what differs

scheduler = dict(num_sampling_steps=40, solver="published")  # Wan2.1 generate.py's i2v default steps, UniPC
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 1 for the reward)
