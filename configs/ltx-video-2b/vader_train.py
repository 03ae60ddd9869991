# VADER training on LTX-Video 2B (0.9.0) through diffusers (model.type='ltx'): a LoRA on the transformer's
# self- and cross-attention projections, trained with HPS v2.1 on the first, middle and last frames of a
# 65-frame 480x704 video.
# Run:  vader train configs/ltx-video-2b/vader_train.py --prompt-path prompts.txt
# The final LoRA is written twice: <run>/lora (ours: resume, `vader infer --lora_ckpt_path`) and
# <run>/lora/diffusers (pytorch_lora_weights.safetensors for LTXPipeline.load_lora_weights / ComfyUI).
# vader_inference.py builds on this file (its _base_): what is set here holds for inference too.
image_size = (480, 704)  # (height, width), multiples of 32 (the VAE compresses 32x); LTXPipeline's example size
num_frames = 65  # 8k + 1 (the VAE packs 8 frames per latent frame); the pipeline's default is 161
save_fps = 25  # LTXPipeline's frame_rate (its rope is scaled by it)

model = dict(
    type="ltx",
    from_pretrained="Lightricks/LTX-Video",  # a hub id or a local folder in the diffusers layout
)
vae = dict(from_pretrained=None)  # None: the pipeline's own AutoencoderKLLTXVideo (in dtype)
text_encoder = dict(from_pretrained=None, model_max_length=128)  # T5-XXL, LTXPipeline's max_sequence_length
scheduler = dict(
    num_sampling_steps=30,  # flow-matching Euler steps (the pipeline's default is 50); cost grows with them
    cfg_scale=3.0,  # LTXPipeline's default guidance
    solver="differentiable",  # 'published' is the same Euler step for LTX-Video
)
negative_prompt = "worst quality, inconsistent motion, blurry, jittery, distorted"  # diffusers' LTX example

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

dtype = "bf16"  # transformer, T5 and VAE weights; the LoRA itself trains in fp32
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
# LTX-Video's decoder is not causal: any chosen frame needs the whole latent video decoded with gradients,
# so 'fml' (three frames for the reward) costs the same decode as one frame
decode_frame = "fml"  # '-1' random frame, a frame index like '3', 'fml', 'all', 'alt' (output frames)
decode_strategy = "exact"  # the only strategy for backends
is_sample_preview = True  # generate and save validation videos
grad_checkpoint = True  # checkpoint transformer blocks and the VAE's decoder blocks
