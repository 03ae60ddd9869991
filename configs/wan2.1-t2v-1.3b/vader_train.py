# VADER training on Wan2.1-T2V-1.3B through diffusers (model.type='wan'): a LoRA on the transformer's
# attention, trained with HPS v2.1 on one decoded frame of a 33-frame 480x832 video.
# Run:  vader train configs/wan2.1-t2v-1.3b/vader_train.py --prompt-path prompts.txt
# The final LoRA is written twice: <run>/lora (ours: resume, `vader infer --lora_ckpt_path`) and
# <run>/lora/diffusers (pytorch_lora_weights.safetensors for WanPipeline.load_lora_weights / ComfyUI).
# vader_inference.py builds on this file (its _base_): what is set here holds for inference too.
image_size = (480, 832)  # (height, width), multiples of 16; a backend needs it explicitly (no Open-Sora tables)
num_frames = 33  # 4k + 1 (the VAE keeps frame 0 and packs 4 frames per latent frame); Wan's default is 81
save_fps = 16  # Wan2.1 makes 16 fps video

model = dict(
    type="wan",
    from_pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",  # a hub id or a local folder in the diffusers layout
)
vae = dict(from_pretrained=None)  # None: the pipeline's own AutoencoderKLWan (kept in fp32)
text_encoder = dict(from_pretrained=None, model_max_length=512)  # UMT5-XXL, released once the prompts are encoded
scheduler = dict(
    num_sampling_steps=30,  # flow-matching Euler steps (the pipeline's default is 50); cost grows with them
    cfg_scale=5.0,  # WanPipeline's default guidance
    shift=3.0,  # flow shift: 3.0 for 480p, 5.0 for 720p
)
negative_prompt = ""  # WanPipeline's default; Wan's authors use a long list of defects

# training settings
is_vader_training = True  # True: train; False: inference only (`vader run`)
train_batch_size = 1  # videos per process per micro-step
val_batch_size = 1  # videos per process per validation run
num_val_runs = 2  # validation videos = num_val_runs * val_batch_size * num_processes
seed = 200
lora_ckpt_path = None  # a LoRA to start from (one of our lora/ or checkpoint folders)
project_dir = "./project_dir"  # checkpoints, videos and logs go to project_dir/<run>/
lr = 0.0002  # as the Open-Sora config
reward_fn = "hps"  # 'aesthetic', 'hps', 'aesthetic_hps', 'pick_score' (and the built-in 'colorfulness')
gradient_accumulation_steps = 8
lora_rank = 16

dtype = "bf16"  # transformer and UMT5 weights; the LoRA itself trains in fp32
mixed_precision = "bf16"
logger_type = "wandb"  # or 'tensorboard'
validation_steps = 10  # validate every N optimizer steps
checkpointing_steps = 1  # save the LoRA every N optimizer steps
use_wandb = True
wandb_entity = ""
debug = False
use_AdamW8bit = False
hps_version = "v2.1"  # or 'v2.0'
num_train_epochs = 200
max_train_steps = 800
backprop_mode = "last"  # 'last', 'rand', 'specific', or an integer K (the last K steps)
# The first frame: the causal VAE decodes it alone. A later frame needs every chunk before it decoded with
# gradients: `vader plan` puts this config at 16.5 GiB with '0' and 168 GiB with '-1' (random frame, worst draw)
decode_frame = "0"  # '-1' random frame, a frame index like '3', 'fml', 'all', 'alt' (output frames)
decode_strategy = "exact"  # the only strategy for backends: the VAE decodes just the chunks the frames need
is_sample_preview = True  # generate and save validation videos
grad_checkpoint = True  # checkpoint each transformer block in the steps with gradients
