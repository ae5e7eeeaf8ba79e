from .digits import DigitsData, load_digits_split

__all__ = ["DigitsData", "load_digits_split"]
