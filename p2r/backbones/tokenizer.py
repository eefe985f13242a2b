"""A small byte-level BPE tokenizer trained in-process, for the tiny backbones (no downloads).

The corpus is fixed text (our prompt instructions, the tags of the process-aware template and
the vocabulary of the synthetic data set), so the same vocabulary size always gives the same
tokenizer: a tiny SFT checkpoint can be reloaded by a later PA-GRPO or test run that rebuilds
the backbone from the same config.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from p2r.data.prompts import ANSWER_RULES, TEMPLATE_INSTRUCTION

# Qwen-style special tokens: every tiny Qwen backbone shares this list; ids follow this order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL/2.5-VL style template: a video or image item becomes the vision placeholder triple.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DOMAIN_WORDS = (
    "observation think answer video image frame frames shape shapes circle square triangle red green "
    "blue yellow purple orange white black cyan magenta pink gray colour color moves moving left right up "
    "down appears disappears appear disappear turns changes change first second third then after before "
    "how many what which where when is are the a an of in on at to from and or it its one two three four "
    "five six seven eight nine ten zero number count distance travelled pixels widths text word reads "
    "written shown background scene clip start end top bottom middle center so therefore because the "
    "correct option letter A B C D E 0 1 2 3 4 5 6 7 8 9 . , : ? ! ( ) - <observation> </observation> "
    "<think> </think> <answer> </answer> Options: user assistant system"
)


def train_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with the Qwen special tokens and a Qwen-style chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TEMPLATE_INSTRUCTION, *ANSWER_RULES.values(), _DOMAIN_WORDS] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    # Qwen processors look these attributes up on the tokenizer.
    fast.image_token = "<|image_pad|>"
    fast.video_token = "<|video_pad|>"
    return fast
