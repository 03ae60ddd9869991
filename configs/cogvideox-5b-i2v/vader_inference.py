# Inference with CogVideoX-5B-I2V (image-to-video) through diffusers (model.type='cogvideox'), with or without
# a trained LoRA; every prompts file line is `prompt<TAB>image path` (the first frame):
#     vader infer configs/cogvideox-5b-i2v/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
_base_ = "vader_train.py"  # model, sizes, dtype, seed of the training config (next to this file); below, what differs

# CogVideoXImageToVideoPipeline's default step count, and the scheduler THUDM samples CogVideoX-5B-I2V with
scheduler = dict(num_sampling_steps=50, solver="published")
is_vader_training = False
logger_type = "none"
debug = True
decode_frame = "-1"
