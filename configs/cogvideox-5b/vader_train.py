# VADER training on CogVideoX-5B through diffusers (model.type='cogvideox'): a LoRA on the transformer's
# joint text-video attention (42 blocks), trained with HPS v2.1 on one decoded frame of a 49-frame 480x720 video.
# Run:  vader train configs/cogvideox-5b/vader_train.py --prompt-path prompts.txt
# The final LoRA is written twice: <run>/lora (ours: resume, `vader infer --lora_ckpt_path`) and
# <run>/lora/diffusers (pytorch_lora_weights.safetensors for CogVideoXPipeline.load_lora_weights / ComfyUI).
# vader_inference.py builds on this file (its _base_): what is set here holds for inference too.
image_size = (480, 720)  # (height, width), multiples of 16; CogVideoX-5B is trained at 480 x 720
num_frames = 49  # 8k + 1 (an odd number of latent frames); CogVideoX-5B is trained on 49
save_fps = 8  # CogVideoX makes 8 fps video

model = dict(
    type="cogvideox",
    from_pretrained="THUDM/CogVideoX-5b",  # a hub id or a local folder in the diffusers layout
)
vae = dict(from_pretrained=None)  # None: the pipeline's own AutoencoderKLCogVideoX (in dtype)
text_encoder = dict(from_pretrained=None, model_max_length=226)  # T5-XXL; must equal max_text_seq_length (226)
scheduler = dict(
    num_sampling_steps=30,  # v-prediction DDIM steps (the pipeline's default is 50); cost grows with them
    cfg_scale=6.0,  # CogVideoXPipeline's default guidance
    use_dynamic_cfg=True,  # the pipeline's cosine ramp of the guidance over the steps, as THUDM samples the 5B
    # 'differentiable': every step is the DDIM step the gradients go through (validation too);
    # 'published': steps without gradients take CogVideoXDPMScheduler's stochastic step, as THUDM samples
    # the 5B (vader_inference.py uses it)
    solver="differentiable",
)
negative_prompt = ""  # CogVideoXPipeline's default

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

dtype = "bf16"  # transformer, T5 and VAE weights (CogVideoX-5B is published for bf16); the LoRA trains in fp32
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
# The first frame: the causal VAE decodes it alone (a later frame needs every chunk before it with gradients)
decode_frame = "0"  # '-1' random frame, a frame index like '3', 'fml', 'all', 'alt' (output frames)
decode_strategy = "exact"  # the only strategy for backends: the VAE decodes just the chunk the frames need
is_sample_preview = True  # generate and save validation videos
grad_checkpoint = True  # checkpoint transformer blocks and the VAE's decoder blocks
