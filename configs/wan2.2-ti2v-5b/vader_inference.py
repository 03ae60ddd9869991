# Inference with Wan2.2-TI2V-5B through diffusers (model.type='wan'), with or without a trained LoRA, from text
# or from text and a first frame per prompt:
#     vader infer configs/wan2.2-ti2v-5b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
# Sampled as Wan2.2 samples TI2V-5B: 50 steps of UniPC (scheduler.solver='published', UniPCMultistepScheduler
# with flow_shift 5.0 as the diffusers repo ships it), guidance 5.0, 121 frames of 704x1280 at 24 fps.
_base_ = "vader_train.py"  # model, sizes, guidance, shift, dtype, seed of the training config; below, what differs

scheduler = dict(num_sampling_steps=50, solver="published")  # Wan2.2 ti2v_5B's sample_steps, UniPC
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"  # the default (training decodes frame 1 for the reward)
