# Inference with Wan2.1-T2V-14B through diffusers (model.type='wan'), with or without a trained LoRA:
#     vader infer configs/wan2.1-t2v-14b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
_base_ = "vader_train.py"  # model, sizes, dtype, seed of the training config (next to this file); below, what differs

scheduler = dict(num_sampling_steps=50, solver="published")  # Wan's default steps (training: 30), with its UniPC
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 0 for the reward)
