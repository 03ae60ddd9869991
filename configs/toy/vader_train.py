# The quick start: align the toy world's pretrained base model (shipped in the package, trained on CPU
# by tools/toyworld/train_base.py) to the toy_alignment reward — a small video classifier's
# log-probability of the shape, colour, size, motion and background the caption names — on the 48
# held-out captions the base model never saw. Everything is offline; a 2-core CPU is enough:
#     vader train configs/toy/vader_train.py
# The run folder shows the change: before_after.png (base vs LoRA, same prompts and seeds),
# reward_curve.png, samples/ and base_val_reward / val_reward in metrics.jsonl.
from vader.toyworld import WEIGHTS as _WEIGHTS  # underscore: not a config key

image_size = (64, 64)  # (height, width): the world's resolution
num_frames = 17  # one temporal VAE chunk -> 5 latent frames
fps = 24  # the fps conditioning the denoiser was trained with
save_fps = 8

model = dict(type="STDiT3-tiny", from_pretrained=f"{_WEIGHTS}/denoiser")
vae = dict(type="OpenSoraVAE_V1_2-tiny", from_pretrained=f"{_WEIGHTS}/vae", micro_frame_size=17, micro_batch_size=17)
text_encoder = dict(type="t5", from_pretrained=f"{_WEIGHTS}/text_encoder", model_max_length=40)
scheduler = dict(type="rflow", use_timestep_transform=True, num_sampling_steps=12, cfg_scale=4.0)
aes = None  # the toy captions were trained without Open-Sora's "aesthetic score" suffix
prompt_path = "prompts_heldout.txt"  # next to this file: captions the base model never saw

is_vader_training = True
train_batch_size = 2
val_batch_size = 8
num_val_runs = 3  # 24 validation videos: the base-vs-LoRA comparison needs more than a few
seed = 200
project_dir = "./project_dir"
run_name = None
lr = 6e-4  # higher rates raise the reward faster but start to fool the classifier (see README)
reward_fn = "toy_alignment"
gradient_accumulation_steps = 1
lora_rank = 8
lora_alpha = 8.0
dtype = "fp32"
mixed_precision = "no"
logger_type = "tensorboard"
use_wandb = False
validation_steps = 0  # validate (and compare with the base model) at the end only
checkpointing_steps = 40
max_train_steps = 120
num_train_epochs = 100
backprop_mode = 3  # DRaFT-K: the last 3 of 12 steps get gradients (the original default is "last")
decode_frame = "all"  # the whole clip, as validation scores it (the classifier reads motion)
is_sample_preview = True
grad_checkpoint = False
