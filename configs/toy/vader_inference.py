# Inference with the toy world's pretrained base model (shipped in the package, ~8 MB, trained on CPU by
# tools/toyworld/train_base.py): the real Open-Sora v1.2 classes (STDiT3, VAE v1.2, T5 encoder) at toy
# size, which draw the world's coloured shapes moving on a plain background. It never saw the held-out
# captions listed next to this file; prompts_pretrain.txt holds the ones it was trained on.
#     vader infer configs/toy/vader_inference.py
# vader_train.py builds on this file (its _base_): what is set here holds for training too.
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
prompt_path = "prompts_heldout.txt"  # next to this file

is_vader_training = False
val_batch_size = 8
num_val_runs = 1
seed = 200
project_dir = "./project_dir"
run_name = None
dtype = "fp32"
mixed_precision = "no"
logger_type = "tensorboard"
use_wandb = False
