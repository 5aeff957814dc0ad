"""Runs in other tools' formats: TensorBoard event files (`tensorboard`) and Hugging Face checkpoint series (`hf_series`)."""
