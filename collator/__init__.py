from .deepseek_ocr import IGNORE_INDEX, DeepSeekOCRDataCollator

__all__ = ["IGNORE_INDEX", "DeepSeekOCRDataCollator"]
