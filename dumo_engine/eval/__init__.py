from .digits import DigitsJudge, frechet_distance, save_grid
from .evaluate import evaluate_digits, generate

__all__ = ["DigitsJudge", "frechet_distance", "save_grid", "evaluate_digits", "generate"]
