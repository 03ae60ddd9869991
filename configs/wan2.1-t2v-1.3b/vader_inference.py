# Inference with Wan2.1-T2V-1.3B through diffusers (model.type='wan'), with or without a trained LoRA:
#     vader infer configs/wan2.1-t2v-1.3b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
image_size = (480, 832)  # (height, width), multiples of 16
num_frames = 33  # 4k + 1; 81 is Wan's default length (5 s at 16 fps)
save_fps = 16

model = dict(type="wan", from_pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
vae = dict(from_pretrained=None)  # the pipeline's own VAE
text_encoder = dict(from_pretrained=None, model_max_length=512)
scheduler = dict(num_sampling_steps=50, cfg_scale=5.0, shift=3.0)  # WanPipeline's defaults (Euler sampler)
negative_prompt = ""

is_vader_training = False
val_batch_size = 1  # videos per process per run
num_val_runs = 2  # videos = num_val_runs * val_batch_size * num_processes, cycling through the prompts
seed = 200
lora_ckpt_path = None  # our lora/ or checkpoint folder (rank and alpha are read from it)
project_dir = "./project_dir"
dtype = "bf16"
mixed_precision = "bf16"
logger_type = "none"
debug = True
