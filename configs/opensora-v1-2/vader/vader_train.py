# VADER training on Open-Sora v1.2 (the original VADER-Open-Sora defaults).
# Run:  vader train configs/opensora-v1-2/vader/vader_train.py --num-frames 2s --resolution 240p \
#           --aspect-ratio 3:4 --prompt-path prompts.txt
resolution = "240p"
aspect_ratio = "9:16"
num_frames = 16  # the original default; Open-Sora lengths such as "2s" (51 frames) are what VADER trains on
fps = 24
frame_interval = 1
save_fps = 24

multi_resolution = "STDiT2"
condition_frame_length = 5
align = 5

model = dict(
    type="STDiT3-XL/2",
    from_pretrained="hpcai-tech/OpenSora-STDiT-v3",
    qk_norm=True,
    enable_flash_attn=False,
    enable_layernorm_kernel=False,
)
vae = dict(
    type="OpenSoraVAE_V1_2",
    from_pretrained="hpcai-tech/OpenSora-VAE-v1.2",
    micro_frame_size=17,
    micro_batch_size=4,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=300,
)
scheduler = dict(
    type="rflow",
    use_timestep_transform=True,
    num_sampling_steps=30,
    cfg_scale=7.0,
)

aes = 6.5
flow = None

# training settings
is_vader_training = True  # True: train; False: inference only (`vader run`)
train_batch_size = 1  # videos per process per micro-step
val_batch_size = 1  # videos per process per validation run
num_val_runs = 2  # validation videos = num_val_runs * val_batch_size * num_processes
seed = 200
lora_ckpt_path = None  # a LoRA to start from (ours, or the original's peft_model_<step>.pt)
project_dir = "./project_dir"  # checkpoints, videos and logs go to project_dir/<run>/
lr = 0.0002
reward_fn = "hps"  # 'aesthetic', 'hps', 'aesthetic_hps', 'pick_score' (and the built-in 'colorfulness')
gradient_accumulation_steps = 8
lora_rank = 16

dtype = "bf16"  # bf16 is recommended for 240p and 360p
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
decode_frame = "-1"  # '-1' random frame, a frame index like '3', 'fml', 'all', 'alt'
is_sample_preview = True  # generate and save validation videos
grad_checkpoint = True  # checkpoint each denoiser call to save memory
