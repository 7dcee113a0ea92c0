"""The computation behind `demo.forecast`: a seasonal-naive vs moving-average backtest.

Pure Python and deterministic: the synthetic daily sales series of a store/product pair is
seeded from a hash of the pair, so every process computes the same numbers.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

HISTORY_DAYS = 730
SEASON = 7
MOVING_AVERAGE_WINDOW = 28


@dataclass(frozen=True)
class Metrics:
    mae: float
    rmse: float
    smape: float

    def as_dict(self) -> dict[str, float]:
        return {"mae": round(self.mae, 4), "rmse": round(self.rmse, 4), "smape": round(self.smape, 4)}


def synthetic_sales(store: str, product: str, days: int = HISTORY_DAYS) -> list[float]:
    """Daily unit sales with level, trend, weekly and yearly seasonality and noise."""
    seed = int.from_bytes(hashlib.sha256(f"{store}\x00{product}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    level = rng.uniform(20, 200)
    trend = rng.uniform(-0.02, 0.05)
    weekly = [rng.uniform(0.7, 1.4) for _ in range(SEASON)]
    yearly_amplitude = rng.uniform(0.0, 0.3)
    noise = rng.uniform(0.05, 0.2)
    series = []
    for day in range(days):
        yearly = 1 + yearly_amplitude * math.sin(2 * math.pi * day / 365.25)
        mean = max(level + trend * day, 1.0) * weekly[day % SEASON] * yearly
        series.append(max(0.0, rng.gauss(mean, mean * noise)))
    return series


def seasonal_naive(history: list[float], horizon: int) -> list[float]:
    last_season = history[-SEASON:]
    return [last_season[step % SEASON] for step in range(horizon)]


def moving_average(history: list[float], horizon: int) -> list[float]:
    window = history[-MOVING_AVERAGE_WINDOW:]
    return [sum(window) / len(window)] * horizon


def score(actual: list[float], predicted: list[float]) -> Metrics:
    errors = [a - p for a, p in zip(actual, predicted, strict=True)]
    mae = sum(abs(e) for e in errors) / len(errors)
    rmse = math.sqrt(sum(e * e for e in errors) / len(errors))
    smape = (
        sum(2 * abs(a - p) / (abs(a) + abs(p)) for a, p in zip(actual, predicted, strict=True) if a or p)
        / len(errors)
        * 100
    )
    return Metrics(mae=mae, rmse=rmse, smape=smape)


def backtest(store: str, product: str, horizon: int) -> dict[str, object]:
    """Hold out the last `horizon` days, score both methods, forecast ahead with the better."""
    series = synthetic_sales(store, product)
    train, test = series[:-horizon], series[-horizon:]
    methods = {"seasonal_naive": seasonal_naive, "moving_average": moving_average}
    metrics = {name: score(test, method(train, horizon)) for name, method in methods.items()}
    best = min(metrics, key=lambda name: metrics[name].mae)
    forecast = methods[best](series, horizon)
    return {
        "store": store,
        "product": product,
        "horizon": horizon,
        "best_method": best,
        "metrics": {name: m.as_dict() for name, m in metrics.items()},
        "forecast": [round(value, 2) for value in forecast],
    }
