"""Text for prompts: CLIP's byte-level BPE tokenizer (reads only its vendored vocabulary)."""
from .tokenizer import ClipTokenizer, TextDependencyError, VocabularyError, tokenize

__all__ = ["ClipTokenizer", "TextDependencyError", "VocabularyError", "tokenize"]
