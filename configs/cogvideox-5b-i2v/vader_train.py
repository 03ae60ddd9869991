# VADER training on CogVideoX-5B-I2V (image-to-video, CogVideoXImageToVideoPipeline) through diffusers
# (model.type='cogvideox'): the CogVideoX-5B recipe (../cogvideox-5b, this file's _base_) on the I2V checkpoint.
# Every prompt needs its first frame: a prompts file line is `prompt<TAB>image path` (the path relative to
# the prompts file). The video's frame 0 is generated, conditioned on the image (not the image itself), so
# decode_frame '0' (decoded alone by the causal VAE: the cheapest) scores the model's own frame; a later
# frame ('-1', 'fml') lets the reward see the motion, for far more memory (`vader plan`: 37 vs 90 GiB).
# Run:  vader train configs/cogvideox-5b-i2v/vader_train.py --prompt-path prompts.txt
# The final LoRA loads with CogVideoXImageToVideoPipeline.load_lora_weights("<run>/lora/diffusers").
_base_ = "../cogvideox-5b/vader_train.py"  # everything not set here

image_size = (480, 720)  # must be 480 x 720: the I2V transformer's learned positional embedding fixes its size
model = dict(from_pretrained="THUDM/CogVideoX-5b-I2V")  # a hub id or a local folder in the diffusers layout
