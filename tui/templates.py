"""Recipe templates for "new recipe": a ready-to-run starting point for each kind of work."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    key: str
    title: str
    text: str

    def render(self, name: str) -> str:
        return self.text.replace("{name}", name)


IMAGES = Template("images", "Text to image (tiny built-in model, runs anywhere in seconds)", '''\
[recipe]
name = "{name}"
description = "Text to image. Set model to black-forest-labs/FLUX.1-dev for real pictures."

[vars]
subject = "a lighthouse on a cliff at dawn"

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"

[nodes.images]
type = "sample"
model = "@base"
prompt = "${subject}, oil painting"
num_inference_steps = 4
aspect_ratio = "1:1"
seed = 42

[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
''')

LORA = Template("lora", "Train a LoRA on a folder of images, then sample with it", '''\
[recipe]
name = "{name}"
description = "LoRA for my style, then a few samples"

[vars]
trigger = "TOK"

[nodes.base]
type = "load_model"
model = "black-forest-labs/FLUX.1-dev"

[nodes.data]
type = "dataset"
source = "data/my_style"

[nodes.captions]
type = "caption"
dataset = "@data"
prefix = "a photo in the style of ${trigger}, "

[nodes.lora]
type = "train_lora"
model = "@base"
dataset = "@captions"
trigger_word = "${trigger}"
steps = 1000
lora_rank = 16
learning_rate = 4e-4

[nodes.styled]
type = "apply_lora"
model = "@base"
lora = "@lora"

[nodes.images]
type = "sample"
model = "@styled"
prompt = "a lighthouse in the style of ${trigger}"
seed = 42

[nodes.saved]
type = "save"
images = "@images"
''')

TEMPLATES: dict[str, Template] = {t.key: t for t in (IMAGES, LORA)}
DEFAULT = IMAGES.key
