# The built-in tiny offline preset: the real Open-Sora v1.2 structure (STDiT3 blocks, AutoencoderKL +
# temporal VAE, T5 encoder) at toy sizes with random weights, and a reward that needs no weights.
# It trains a LoRA end to end on a 2-core CPU in seconds (30 steps, ~0.2 s each) with no download:
#     vader train configs/tiny/vader_train.py
# vader_inference.py builds on this file (its _base_): what is set here holds for inference too.
image_size = (64, 64)  # (height, width); overrides resolution / aspect_ratio
num_frames = 17  # one temporal VAE chunk -> 5 latent frames
fps = 24
save_fps = 8

model = dict(type="STDiT3-tiny", from_pretrained=None)
vae = dict(type="OpenSoraVAE_V1_2-tiny", from_pretrained=None, micro_frame_size=17, micro_batch_size=4)
text_encoder = dict(type="t5-tiny", from_pretrained=None, model_max_length=16)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=8, cfg_scale=4.0)
aes = 6.5
prompt_path = "prompts.txt"  # next to this file

is_vader_training = True
train_batch_size = 2
val_batch_size = 2
num_val_runs = 1
seed = 200
project_dir = "./project_dir"
run_name = None
lr = 0.05
reward_fn = "colorfulness"
gradient_accumulation_steps = 1
lora_rank = 4
dtype = "fp32"
mixed_precision = "no"
logger_type = "tensorboard"
use_wandb = False
validation_steps = 0  # sample videos at the end only
checkpointing_steps = 10
max_train_steps = 30
num_train_epochs = 100
backprop_mode = 4  # DRaFT-K: the last 4 of 8 steps (the original default is "last")
decode_frame = "fml"
is_sample_preview = True
grad_checkpoint = False
