"""Raw rows -> canonical Gemma dialogues -> control-token ids and loss masks: a library with no knowledge of recipes,
run directories or training (the data stage, ``pipeline.data``, drives it).

``render(messages, add_generation_prompt=False)`` returns the exact Gemma-format text of OpenAI-style messages.
"""

from data_prep.gemma_format import CHAT_TEMPLATE, FormatError, GemmaEncoder, render

__all__ = ["CHAT_TEMPLATE", "FormatError", "GemmaEncoder", "render"]
