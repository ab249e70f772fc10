"""A custom model family registered from outside fla/transformers, for tests/test_trainer.py."""

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


class MyLlamaConfig(LlamaConfig):
    model_type = "my_llama"


class MyLlamaForCausalLM(LlamaForCausalLM):
    config_class = MyLlamaConfig


AutoConfig.register("my_llama", MyLlamaConfig)
AutoModelForCausalLM.register(MyLlamaConfig, MyLlamaForCausalLM)
