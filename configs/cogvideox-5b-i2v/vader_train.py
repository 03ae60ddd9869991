# VADER training on CogVideoX-5B-I2V (image-to-video, CogVideoXImageToVideoPipeline) through diffusers
# (model.type='cogvideox'): a LoRA on the transformer's joint text-video attention, trained with HPS v2.1.
# Every prompt needs its first frame: a prompts file line is `prompt<TAB>image path` (the path relative to
# the prompts file). The video's frame 0 is generated, conditioned on the image (not the image itself).
# Run:  vader train configs/cogvideox-5b-i2v/vader_train.py --prompt-path prompts.txt
# The final LoRA is written twice: <run>/lora (ours) and <run>/lora/diffusers (pytorch_lora_weights.safetensors
# for CogVideoXImageToVideoPipeline.load_lora_weights / ComfyUI).
# vader_inference.py builds on this file (its _base_): what is set here holds for inference too.
image_size = (480, 720)  # must be 480 x 720: the I2V transformer's learned positional embedding fixes its size
num_frames = 49  # 8k + 1; CogVideoX-5B-I2V is trained on 49
save_fps = 8  # CogVideoX makes 8 fps video

model = dict(
    type="cogvideox",
    from_pretrained="THUDM/CogVideoX-5b-I2V",  # a hub id or a local folder in the diffusers layout
)
vae = dict(from_pretrained=None)  # None: the pipeline's own AutoencoderKLCogVideoX (in dtype); it also encodes the images
text_encoder = dict(from_pretrained=None, model_max_length=226)  # T5-XXL; must equal max_text_seq_length (226)
scheduler = dict(
    num_sampling_steps=30,  # v-prediction DDIM steps (the pipeline's default is 50)
    cfg_scale=6.0,  # CogVideoXImageToVideoPipeline's default guidance
    use_dynamic_cfg=True,  # as THUDM samples the 5B models
    solver="differentiable",  # 'published': steps without gradients take CogVideoXDPMScheduler's step
)
negative_prompt = ""  # the pipeline's default

# training settings
is_vader_training = True
train_batch_size = 1
val_batch_size = 1
num_val_runs = 2
seed = 200
lora_ckpt_path = None
project_dir = "./project_dir"
lr = 0.0002
reward_fn = "hps"  # 'aesthetic', 'hps', 'aesthetic_hps', 'pick_score' (and the built-in 'colorfulness')
gradient_accumulation_steps = 8
lora_rank = 16

dtype = "bf16"  # transformer, T5 and VAE weights; the LoRA trains in fp32
mixed_precision = "bf16"
logger_type = "wandb"
validation_steps = 10
checkpointing_steps = 1
use_wandb = True
wandb_entity = ""
debug = False
use_AdamW8bit = False
hps_version = "v2.1"
num_train_epochs = 200
max_train_steps = 800
backprop_mode = "last"
# Frame 0 is decoded alone by the causal VAE (cheapest); it is generated, so the reward scores the model's
# frame, but it stays close to the given image: a later frame ('-1', 'fml') lets the reward see the motion
decode_frame = "0"
decode_strategy = "exact"
is_sample_preview = True
grad_checkpoint = True
