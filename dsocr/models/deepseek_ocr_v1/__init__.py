"""Native DeepSeek-OCR v1 (``deepseek-ai/DeepSeek-OCR``) on current transformers: config, model, family.

Import the submodules directly (``.configuration``, ``.modeling``, ``.family``, ``.processing``); this
package imports nothing itself so that a config check loads no model code.
"""
