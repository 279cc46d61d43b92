"""A spectral plan in your own training script: a plain transformers Trainer plus one callback.

    .venv/bin/python examples/own_trainer_callback.py        # about a minute on 2 cores

Everything here is the user's usual code (model, tokenizer, dataset, TrainingArguments,
Trainer); spectune adds one line, the callback, which gives every matrix its plan rate
(alpha-balance, rescaled to a mean rate of 1), re-plans at the second epoch and tracks
spectra. The data are spectune's built-in TREC questions only to have real text at hand;
any datasets.Dataset works. For a full run drop ``max_examples`` / ``max_eval_examples``.
"""

from __future__ import annotations

import numpy as np
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

from spectune.analyze.builtin import resolve
from spectune.integrations import SpectralPlanCallback
from spectune.train.data import DataConfig, load_data

splits = load_data(DataConfig(name="trec", max_examples=256, max_eval_examples=200))
folder = resolve("minilm")
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(splits.label_names or []))


def encode(batch: dict) -> dict:
    return tok(batch["text"], truncation=True, max_length=48)


train = splits.train.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
test = splits.test.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
args = TrainingArguments(output_dir="runs/own-trainer-callback", num_train_epochs=2, per_device_train_batch_size=16,
                         learning_rate=2e-4, weight_decay=0.01, warmup_steps=3, save_strategy="no",
                         report_to=[], use_cpu=True, logging_steps=8)
plan = SpectralPlanCallback("alpha-balance", {"normalize": "mean"}, replan="epoch", track_every_steps=8)
trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                  callbacks=[plan])
trainer.train()
pred = trainer.predict(test)
print(f"test accuracy {np.mean(pred.predictions.argmax(-1) == pred.label_ids):.3f}; re-plans: {plan.history}")
