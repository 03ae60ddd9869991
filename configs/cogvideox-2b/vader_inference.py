# Inference with CogVideoX-2B through diffusers (model.type='cogvideox'), with or without a trained LoRA:
#     vader infer configs/cogvideox-2b/vader_inference.py --prompt-path prompts.txt \
#         --lora_ckpt_path project_dir/<run>/lora
image_size = (480, 720)  # (height, width), multiples of 16
num_frames = 49  # 8k + 1
save_fps = 8

model = dict(type="cogvideox", from_pretrained="THUDM/CogVideoX-2b")
vae = dict(from_pretrained=None)  # the pipeline's own VAE
text_encoder = dict(from_pretrained=None, model_max_length=226)
scheduler = dict(num_sampling_steps=50, cfg_scale=6.0, use_dynamic_cfg=False)  # CogVideoXPipeline's defaults
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
