"""A character-level tokenizer built locally (no download), saved with every checkpoint.

It is a ``tokenizers`` model wrapped in ``transformers.PreTrainedTokenizerFast``, so
``AutoTokenizer.from_pretrained(checkpoint_dir)`` loads it back like any HF tokenizer.
Every character of the alphabet is one token; ``<bos>`` / ``<eos>`` are added around each
text, ``<pad>`` is a separate id (never equal to ``<eos>``), and characters outside the
alphabet map to ``<unk>``. A small chat template (``role: content`` lines) lets it render
TRL's conversational preference format.

Unlike most LLM tokenizers it adds ``<eos>`` itself. TRL's reward data path (and so
``rmkernels.integrations.trl.RewardTrainer``) appends the EOS text to plain-text pairs too, so
there each sequence ends ``<eos> <eos>`` where ``rmkernels-train reward`` gives one ``<eos>``: the
two score a text at different tokens (conversational data, rendered by the chat template
without special tokens, tokenizes the same both ways).
"""
import os

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def build_char_tokenizer(alphabet):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens followed by the
    sorted distinct characters of ``alphabet`` (a string or an iterable of texts)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not isinstance(alphabet, str):
        alphabet = "".join(alphabet)
    chars = sorted(set(alphabet) - {"\r"})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A $B <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", truncation_side="left",
                                   model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def check_chat_template(tokenizer, path):
    """The chat template(s) of a tokenizer loaded from the directory ``path`` must compile
    (as ``apply_chat_template`` compiles them): else a :class:`TrainingError` naming the file
    (``chat_template.jinja``, or ``tokenizer_config.json``'s ``chat_template``), not jinja2's
    traceback at the first conversational record."""
    from rmkernels_train.utils import TrainingError, one_line

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: apply_chat_template reports it
        return
    templates = template.values() if isinstance(template, dict) else [template]
    for t in templates:
        try:
            _compile_jinja_template(t)
        except ImportError:  # no jinja2: apply_chat_template says so when it is needed
            return
        except Exception as e:  # jinja2.TemplateSyntaxError (and what a broken template raises)
            names = [n for n in ("chat_template.jinja", "chat_template.json") if os.path.isfile(os.path.join(path, n))]
            where = (os.path.join(path, names[0]) if names
                     else f"{os.path.join(path, 'tokenizer_config.json')}'s chat_template")
            line = one_line(e)
            lineno = getattr(e, "lineno", None)
            raise TrainingError(f"{where}: the chat template does not parse ({type(e).__name__}"
                                f"{f' at line {lineno}' if lineno else ''}: {line})") from None
