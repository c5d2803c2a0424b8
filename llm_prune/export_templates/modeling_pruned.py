# Modeling code for a checkpoint pruned by llm-prune whose decoder layers differ in width.
#
# config.json lists each layer's widths under `per_layer_config` (the key transformers 5.x uses
# for heterogeneous models); this file builds every decoder layer from its own view of the config
# and is otherwise the stock __BASE__ implementation. Load with
#   AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
from transformers import __BASE_CONFIG__, __BASE_MODEL__
from transformers.models.__MODULE__.modeling___MODULE__ import __DECODER_LAYER__

PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


class Pruned__BASE_CONFIG__(__BASE_CONFIG__):
    model_type = "__MODEL_TYPE__"

    def __init__(self, **kwargs):
        # Stock code that reads a global width (validation, cache sizing, rotary setup) gets the
        # unpruned one; every layer reads its own width through per_layer_config below.
        self.__dict__["allow_global_per_layer_attribute_access"] = True
        super().__init__(**kwargs)


class Pruned__BASE_MODEL__(__BASE_MODEL__):
    config_class = Pruned__BASE_CONFIG__

    def __init__(self, config):
        super().__init__(config)
        if config.is_heterogeneous:
            for i in range(config.num_hidden_layers):
                self.model.layers[i] = __DECODER_LAYER__(config.per_layer_config[i], i)
            self.post_init()
