"""Tiny random models of every architecture family in mlx-lm's ``mlx_lm/models``.

A data module for tests (it holds no tests). ``FAMILIES`` maps each model module to a
tiny config (hidden size <= 128, at most 4 decoder layers, vocab 261, sliding windows
and attention chunks of 8-16 tokens so a 40-100 token prompt scrolls them, 4 experts
top-2), ``build(name)`` makes a deterministic float32 random model from it,
``CACHE_TYPES`` names what ``make_prompt_cache(model)`` returns, ``CHUNK_VARIANT``
lists the families whose logits depend on how a prompt is split into prefill chunks,
and ``SKIPPED`` says why each other module file is not a family. A few families need
a fix after construction (zero-initialised output weights, Metal-only kernels on a
CPU backend); ``_FIXUPS`` holds them, each with its reason.
"""

from __future__ import annotations

import copy
import importlib
import types

import mlx.core as mx
from mlx import nn

VOCAB = 261

FAMILIES: dict[str, dict] = {
    "Klear": dict(model_type="Klear", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, attention_bias=False, mlp_only_layers=[0], num_experts=4,
                  num_experts_per_tok=2, decoder_sparse_step=1, n_shared_experts=1, moe_intermediate_size=32,
                  rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2, rope_theta=1e4,
                  max_position_embeddings=4096, norm_topk_prob=True),
    # Two KV layers plus one layer that reuses the last layer's cache (num_kv_reuse_layers).
    "afm7": dict(model_type="afm7", vocab_size=VOCAB, hidden_dim=64, num_layers=3, num_kv_reuse_layers=1,
                 num_heads=4, num_kv_heads=2),
    "afmoe": dict(model_type="afmoe", layer_types=["sliding_attention", "full_attention"] * 2, vocab_size=VOCAB,
                  hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  num_experts=4, num_experts_per_tok=2, num_shared_experts=1, num_dense_layers=1,
                  sliding_window=8),
    "apertus": dict(model_type="apertus", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                    mlp_bias=False, num_attention_heads=4, attention_bias=False, rms_norm_eps=1e-5,
                    vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4,
                    post_norm=False, qk_norm=True, tie_word_embeddings=False),
    "baichuan_m1": dict(model_type="baichuan_m1", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4,
                        sliding_window=8, sliding_window_layers=[0], conv_window=2, rms_norm_eps=1e-6),
    "bailing_hybrid": dict(model_type="bailing_hybrid", hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                           n_group=1, topk_group=1, first_k_dense_replace=1, layer_group_size=2,
                           group_norm_size=1, vocab_size=VOCAB, rms_norm_eps=1e-6, rope_theta=1e4,
                           max_position_embeddings=4096, routed_scaling_factor=1.0, head_dim=16,
                           kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                           v_head_dim=16),
    "bailing_moe": dict(model_type="bailing_moe", hidden_size=64, intermediate_size=128,
                        max_position_embeddings=4096, moe_intermediate_size=32, num_experts=4,
                        num_shared_experts=1, norm_topk_prob=True, num_attention_heads=4, num_experts_per_tok=2,
                        num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
                        vocab_size=VOCAB, first_k_dense_replace=1),
    "bailing_moe_linear": dict(model_type="bailing_moe_linear", hidden_size=64, intermediate_size=128,
                               max_position_embeddings=4096, moe_intermediate_size=32, num_experts=4,
                               num_shared_experts=1, norm_topk_prob=True, num_attention_heads=4,
                               num_experts_per_tok=2, num_hidden_layers=4, num_key_value_heads=2,
                               rms_norm_eps=1e-6, rope_theta=1e4, vocab_size=VOCAB, first_k_dense_replace=1,
                               layer_group_size=2, group_norm_size=1),
    "bailing_moe_v3": dict(model_type="bailing_hybrid", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_hidden_layers=4,
                           num_attention_heads=4, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                           first_k_dense_replace=1, n_group=1, topk_group=1, layer_group_size=2, head_dim=16,
                           q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                           v_head_dim=16, short_conv_kernel_size=4, rope_theta=1e4, max_position_embeddings=4096),
    "bitnet": dict(model_type="bitnet", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB),
    "cohere": dict(model_type="cohere", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB),
    "cohere2": dict(model_type="cohere2", hidden_size=64, head_dim=16, num_hidden_layers=4, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, sliding_window=8,
                    sliding_window_pattern=2),
    "dbrx": dict(model_type="dbrx", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4,
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=1e4)),
    "deepseek": dict(model_type="deepseek", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1),
    "deepseek_v2": dict(model_type="deepseek_v2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                        n_group=1, topk_group=1,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024,
                                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16),
    # CacheList(MLA KVCache, indexer KVCache); index_topk 16 < prompt, so the sparse selection is used.
    "deepseek_v32": dict(model_type="deepseek_v32", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                         kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                         index_head_dim=32, index_n_heads=2, index_topk=16),
    # LayerCache per layer. Layer 0: window only; 1: compresses (ratio 2) and owns an indexer; 2: ratio-1
    # compressor, indexer and candidate-block source; 3: reuses layer 2's compressed KV and index keys.
    "deepseek_v41": dict(model_type="deepseek_v41", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                         num_attention_heads=4, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, o_groups=2,
                         o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                         rms_norm_eps=1e-6, sliding_window=8, compress_ratios=[0, 2, 1, 1],
                         kv_source_layer_ids=[1, 2], index_source_layer_ids=[1, 2, 3], candidate_source_layer_id=2,
                         candidate_topk_blocks=2, candidate_block_size=2, index_n_heads=2, index_head_dim=32,
                         index_topk=4, max_position_embeddings=4096, hc_sinkhorn_iters=4),
    "dots1": dict(model_type="dots1", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=4096,
                  num_key_value_heads=2, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=4,
                  n_shared_experts=1, norm_topk_prob=True, num_experts_per_tok=2, rope_theta=1e4,
                  routed_scaling_factor=1.0),
    "ernie4_5": dict(model_type="ernie4_5", hidden_size=64, intermediate_size=128, max_position_embeddings=4096,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                     rms_norm_eps=1e-6, vocab_size=VOCAB, rope_theta=1e4, use_bias=False, tie_word_embeddings=False),
    "ernie4_5_moe": dict(model_type="ernie4_5_moe", hidden_size=64, intermediate_size=128,
                         max_position_embeddings=4096, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, rms_norm_eps=1e-6, vocab_size=VOCAB, rope_theta=1e4, use_bias=False,
                         tie_word_embeddings=False, moe_num_experts=4, moe_layer_start_index=1,
                         moe_intermediate_size=32, moe_k=2, moe_num_shared_experts=1),
    "exaone": dict(model_type="exaone", hidden_size=64, num_layers=2, intermediate_size=128, num_attention_heads=4,
                   vocab_size=VOCAB, rope_theta=1e4, layer_norm_epsilon=1e-5, num_key_value_heads=2),
    "exaone4": dict(model_type="exaone4", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2,
                    max_position_embeddings=4096, rope_theta=1e4, head_dim=16, tie_word_embeddings=False,
                    rope_scaling=None, sliding_window=8, sliding_window_pattern="LG"),
    "exaone_moe": dict(model_type="exaone_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, num_experts=4, num_experts_per_tok=2, num_shared_experts=1, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"] * 2,
                       is_moe_layer=[False, True, True, True], routed_scaling_factor=1.0, rope_theta=1e4),
    "falcon_h1": dict(model_type="falcon_h1", head_dim=16, hidden_size=64, intermediate_size=128, mamba_d_conv=4,
                      mamba_d_head=16, mamba_d_ssm=64, mamba_d_state=16, mamba_expand=1, mamba_n_groups=1,
                      mamba_n_heads=4, mamba_chunk_size=16, max_position_embeddings=4096, num_attention_heads=4,
                      num_hidden_layers=2, num_key_value_heads=2, rope_theta=1e4, vocab_size=VOCAB,
                      tie_word_embeddings=False),
    "gear": dict(model_type="gear", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                 layer_types=["conv_mixer", "sliding_attention", "conv_mixer", "full_attention"], sliding_window=8,
                 max_position_embeddings=4096),
    "gemma": dict(model_type="gemma", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2),
    "gemma2": dict(model_type="gemma2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2,
                   query_pre_attn_scalar=16.0),
    "gemma3": dict(model_type="gemma3", vocab_size=VOCAB,
                   text_config=dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4,
                                    intermediate_size=128, num_attention_heads=4, head_dim=16,
                                    num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=8,
                                    sliding_window_pattern=2)),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                        num_attention_heads=4, head_dim=16, vocab_size=VOCAB, num_key_value_heads=2,
                        query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=2),
    # Layers 2-3 share the KV of layers 0-1: make_cache returns 2 caches for 4 layers.
    "gemma3n": dict(model_type="gemma3n",
                    text_config=dict(model_type="gemma3n_text", hidden_size=64, num_hidden_layers=4,
                                     intermediate_size=128, num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6,
                                     vocab_size=VOCAB, num_key_value_heads=2, num_kv_shared_layers=2,
                                     vocab_size_per_layer_input=VOCAB, sliding_window=8,
                                     max_position_embeddings=4096, rope_local_base_freq=1e4, rope_theta=1e6,
                                     final_logit_softcapping=30.0,
                                     layer_types=["sliding_attention", "full_attention"] * 2,
                                     activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                                     hidden_size_per_layer_input=16, altup_num_inputs=4, altup_coef_clip=120.0,
                                     altup_correct_scale=True, altup_active_idx=0, laurel_rank=8)),
    # Layers 2-3 share the KV of layers 0-1 (2 caches for 4 layers), per-layer input embeddings.
    "gemma4": dict(model_type="gemma4", vocab_size=VOCAB,
                   text_config=dict(model_type="gemma4_text", hidden_size=64, num_hidden_layers=4,
                                    intermediate_size=128, num_attention_heads=4, head_dim=16, global_head_dim=32,
                                    num_key_value_heads=2, num_kv_shared_layers=2, vocab_size_per_layer_input=VOCAB,
                                    hidden_size_per_layer_input=16, sliding_window=8, sliding_window_pattern=2,
                                    max_position_embeddings=4096)),
    # The MoE variant: attention_k_eq_v on full layers, no KV sharing.
    "gemma4_text": dict(model_type="gemma4_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                        num_attention_heads=4, head_dim=16, global_head_dim=32, vocab_size=VOCAB,
                        vocab_size_per_layer_input=VOCAB, num_key_value_heads=2, num_global_key_value_heads=1,
                        num_kv_shared_layers=0, hidden_size_per_layer_input=0, sliding_window=8,
                        sliding_window_pattern=2, max_position_embeddings=4096, attention_k_eq_v=True,
                        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "glm": dict(model_type="glm", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                rms_norm_eps=1e-5, vocab_size=VOCAB, head_dim=16, num_key_value_heads=2),
    "glm4": dict(model_type="glm4", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, attention_bias=True, head_dim=16, rms_norm_eps=1e-5, vocab_size=VOCAB,
                 num_key_value_heads=2, partial_rotary_factor=0.5, rope_theta=1e4),
    "glm4_moe": dict(model_type="glm4_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     max_position_embeddings=4096, moe_intermediate_size=32, norm_topk_prob=True,
                     num_attention_heads=4, n_group=1, head_dim=16, topk_group=1, n_shared_experts=1,
                     n_routed_experts=4, routed_scaling_factor=1.0, num_experts_per_tok=2, first_k_dense_replace=1,
                     num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e4,
                     rope_scaling=None, use_qk_norm=True, tie_word_embeddings=False, attention_bias=True,
                     partial_rotary_factor=0.5),
    "glm4_moe_lite": dict(model_type="glm4_moe_lite", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                          moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=16,
                          q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                          num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=4096),
    "glm_moe_dsa": dict(model_type="glm_moe_dsa", vocab_size=VOCAB, hidden_size=64, index_head_dim=32,
                        index_n_heads=2, index_topk=16, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                        n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, topk_method="noaux_tc",
                        scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1,
                        num_experts_per_tok=2, moe_layer_freq=1, first_k_dense_replace=1,
                        max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_parameters=dict(rope_theta=1e4, rope_type="default"), attention_bias=False),
    "gpt2": dict(model_type="gpt2", n_ctx=1024, n_embd=64, n_head=4, n_layer=2, n_positions=1024,
                 layer_norm_epsilon=1e-5, vocab_size=VOCAB),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_inner=128, n_head=4, n_positions=1024,
                        layer_norm_epsilon=1e-5, vocab_size=VOCAB, multi_query=True),
    "gpt_neox": dict(model_type="gpt_neox", max_position_embeddings=4096, hidden_size=64, num_attention_heads=4,
                     num_hidden_layers=2, layer_norm_eps=1e-5, vocab_size=VOCAB, rotary_emb_base=10000,
                     rotary_pct=0.25),
    "gpt_oss": dict(model_type="gpt_oss", num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2,
                    vocab_size=VOCAB, hidden_size=64, intermediate_size=32, head_dim=16, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=8, rope_theta=150000,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "gptj": dict(model_type="gptj", n_embd=64, vocab_size=VOCAB, n_positions=1024, n_head=4, rotary_dim=8,
                 n_layer=2),
    "granite": dict(model_type="granite", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, logits_scaling=4.0,
                    attention_multiplier=0.0625, embedding_multiplier=12.0, residual_multiplier=0.22,
                    max_position_embeddings=4096, num_key_value_heads=2, attention_bias=False, mlp_bias=False,
                    rope_theta=1e4),
    "granitemoe": dict(model_type="granitemoe", hidden_size=64, num_hidden_layers=2, intermediate_size=32,
                       num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, logits_scaling=4.0,
                       attention_multiplier=0.0625, embedding_multiplier=12.0, residual_multiplier=0.22,
                       max_position_embeddings=4096, num_key_value_heads=2, attention_bias=False, rope_theta=1e4,
                       num_local_experts=4, num_experts_per_tok=2),
    "granitemoehybrid": dict(model_type="granitemoehybrid", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                             num_hidden_layers=4, max_position_embeddings=4096, num_attention_heads=4,
                             num_key_value_heads=2, attention_bias=False, embedding_multiplier=12.0,
                             attention_multiplier=0.0625, logits_scaling=4.0, residual_multiplier=0.22,
                             layer_types=["mamba", "attention", "mamba", "attention"], rms_norm_eps=1e-5,
                             num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
                             mamba_n_heads=4, mamba_d_head=16, mamba_proj_bias=False, mamba_d_state=16,
                             mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True),
    "helium": dict(model_type="helium", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-8, vocab_size=VOCAB,
                   attention_bias=False, head_dim=16, max_position_embeddings=4096, mlp_bias=False, rope_theta=1e5,
                   tie_word_embeddings=False),
    # Cross-layer attention (use_cla): odd layers reuse the k/v projections of the layer before.
    "hunyuan": dict(model_type="hunyuan", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, attention_bias=False,
                    moe_topk=2, num_experts=4, num_shared_expert=1, use_mixed_mlp_moe=True, use_qk_norm=True,
                    rms_norm_eps=1e-5, rope_theta=1e4, use_cla=True, cla_share_factor=2,
                    rope_scaling=dict(alpha=1000.0, factor=1.0, type="dynamic")),
    "hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                             rope_scaling=dict(alpha=1000.0, factor=1.0, type="dynamic")),
    "internlm2": dict(model_type="internlm2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB),
    "internlm3": dict(model_type="internlm3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB),
    # Two loops over the layers: a KVCache per layer, then a RotatingKVCache per layer for the second loop.
    "iquestloopcoder": dict(model_type="iquestloopcoder", hidden_size=64, num_hidden_layers=2,
                            intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB,
                            head_dim=16, num_key_value_heads=2, loop_num=2, loop_window_size=8),
    "jamba": dict(model_type="jamba", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_offset=1, attn_layer_period=2,
                  expert_layer_offset=1, expert_layer_period=2, mamba_d_conv=4, mamba_d_state=16, mamba_expand=2,
                  num_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  vocab_size=VOCAB),
    "kimi_k25": dict(model_type="kimi_k25",
                     text_config=dict(model_type="kimi_k2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                                      num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                                      q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16)),
    "kimi_k3": dict(model_type="kimi_k3",
                    text_config=dict(model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                     linear_attn_config=dict(num_heads=4, head_dim=16, short_conv_kernel_size=4,
                                                             kda_layers=[1, 3]),
                                     attn_res_block_size=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                     qk_rope_head_dim=8, v_head_dim=16, mla_use_output_gate=True, num_experts=4,
                                     num_experts_per_token=2, num_shared_experts=1, moe_intermediate_size=32,
                                     first_k_dense_replace=1, routed_expert_hidden_size=32,
                                     latent_moe_use_norm=True)),
    "kimi_linear": dict(model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, head_dim=16,
                        rope_theta=1e4, rms_norm_eps=1e-5,
                        linear_attn_config=dict(num_heads=4, head_dim=16, short_conv_kernel_size=4,
                                                kda_layers=[1, 3]),
                        model_max_length=4096, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                        moe_intermediate_size=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, mla_use_nope=True, first_k_dense_replace=1),
    "kimi_vl": dict(model_type="kimi_vl",
                    text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                     moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                                     num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                                     q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16)),
    "laguna": dict(model_type="laguna", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=4096, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"] * 2,
                   num_attention_heads_per_layer=[4, 2, 4, 2], mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                   rope_parameters=dict(full_attention=dict(rope_theta=5e5, partial_rotary_factor=0.5),
                                        sliding_attention=dict(rope_theta=1e4)),
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=32),
    "lfm2": dict(model_type="lfm2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, norm_eps=1e-5, conv_bias=False,
                 conv_L_cache=3, block_dim=64, block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=True, intermediate_size=128,
                 layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "lfm2-vl": dict(model_type="lfm2-vl",
                    text_config=dict(model_type="lfm2", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                     norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=64,
                                     block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                                     block_auto_adjust_ff_dim=True, intermediate_size=128,
                                     layer_types=["conv", "full_attention", "conv", "full_attention"])),
    "lfm2_moe": dict(model_type="lfm2_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                     norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                     use_expert_bias=True, num_dense_layers=1, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
                     layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "lille-130m": dict(model_type="lille-130m", block_size=1024, layer_norm_eps=1e-5, n_embd=64, n_head=4,
                       n_kv_heads=2, n_layer=2, rope_theta=1e4, vocab_size=VOCAB),
    # Plain llama; layer_types / sliding_window overrides give it sliding layers.
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB),
    # ChunkedKVCache on layers 0-2 (chunk 8), KVCache on layer 3; the model needs >= 4 layers (cache[3]).
    "llama4": dict(model_type="llama4",
                   text_config=dict(model_type="llama4_text", attention_bias=False, attention_chunk_size=8,
                                    head_dim=16, hidden_size=64, interleave_moe_layer_step=2, intermediate_size=32,
                                    intermediate_size_mlp=128, max_position_embeddings=4096, num_attention_heads=4,
                                    num_experts_per_tok=1, num_hidden_layers=4, num_key_value_heads=2,
                                    num_local_experts=4, rms_norm_eps=1e-5, rope_scaling=None, rope_theta=5e5,
                                    use_qk_norm=True, vocab_size=VOCAB, floor_scale=16)),
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, num_attention_heads=4, num_hidden_layers=4,
                        vocab_size=VOCAB, intermediate_size=32, intermediate_size_mlp=128, num_key_value_heads=2,
                        rms_norm_eps=1e-5, rope_theta=5e5, head_dim=16, tie_word_embeddings=False,
                        no_rope_layers=[1, 1, 1, 0], use_qk_norm=True),
    "longcat_flash": dict(model_type="longcat_flash", attention_method="MLA", zero_expert_type="identity",
                          hidden_size=64, ffn_hidden_size=128, moe_topk=2, expert_ffn_hidden_size=32,
                          n_routed_experts=4, zero_expert_num=2, num_layers=2, vocab_size=VOCAB,
                          max_position_embeddings=4096, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=1.0,
                          rms_norm_eps=1e-5, rope_theta=1e4, mla_scale_q_lora=True, mla_scale_kv_lora=True,
                          attention_bias=False),
    # cache[0] is an ArraysCache holding the last n-1 token ids (int64) for the n-gram embeddings.
    "longcat_flash_ngram": dict(model_type="longcat_flash_ngram", hidden_size=64, ffn_hidden_size=128, moe_topk=2,
                                expert_ffn_hidden_size=32, n_routed_experts=4, zero_expert_num=2, num_layers=2,
                                vocab_size=VOCAB, max_position_embeddings=4096, num_attention_heads=4,
                                kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                v_head_dim=16, routed_scaling_factor=1.0, rms_norm_eps=1e-5, rope_theta=1e4,
                                mla_scale_q_lora=True, mla_scale_kv_lora=True, ngram_vocab_size_ratio=4,
                                emb_neighbor_num=3, emb_split_num=2),
    "mamba": dict(model_type="mamba", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, state_size=16,
                  num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4),
    "mamba2": dict(model_type="mamba2", num_heads=8, head_dim=16, vocab_size=VOCAB, hidden_size=64,
                   intermediate_size=128, state_size=16, num_hidden_layers=2, layer_norm_epsilon=1e-5,
                   conv_kernel=4, n_groups=2, use_bias=False, use_conv_bias=True, tie_word_embeddings=False,
                   time_step_limit=(0.0, float("inf")), time_step_rank=4),
    "mellum": dict(model_type="mellum", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                   num_attention_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                   rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2, head_dim=16,
                   tie_word_embeddings=False, max_position_embeddings=4096, norm_topk_prob=True, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"] * 2,
                   rope_parameters=dict(sliding_attention=dict(rope_theta=1e4),
                                        full_attention=dict(rope_theta=1e6))),
    "mimo": dict(model_type="mimo", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2),
    "mimo_v2_flash": dict(model_type="mimo_v2_flash", num_experts_per_tok=2, hybrid_layer_pattern=[1, 0, 1, 0],
                          moe_layer_freq=[0, 1, 1, 1], add_swa_attention_sink_bias=True,
                          add_full_attention_sink_bias=False, sliding_window_size=8, vocab_size=VOCAB,
                          hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, n_shared_experts=None, n_routed_experts=4,
                          routed_scaling_factor=None, topk_method="noaux_tc", scoring_func="sigmoid",
                          norm_topk_prob=True, n_group=1, topk_group=1, max_position_embeddings=4096,
                          layernorm_epsilon=1e-5, rope_theta=5e6, swa_rope_theta=1e4, swa_num_attention_heads=4,
                          swa_num_key_value_heads=2, head_dim=24, v_head_dim=16, swa_head_dim=24, swa_v_head_dim=16,
                          partial_rotary_factor=0.334),
    "minicpm": dict(model_type="minicpm", hidden_size=64, dim_model_base=32, num_hidden_layers=2,
                    intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB,
                    num_key_value_heads=2, scale_depth=1.4, scale_emb=12.0),
    "minicpm3": dict(model_type="minicpm3", hidden_size=64, dim_model_base=32, num_hidden_layers=2,
                     intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB,
                     num_key_value_heads=4, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                     kv_lora_rank=16, scale_depth=1.4, scale_emb=12.0, max_position_embeddings=4096,
                     rope_scaling=dict(type="longrope", original_max_position_embeddings=32,
                                       short_factor=[1.0, 1.0, 1.5, 2.0], long_factor=[1.0, 2.0, 3.0, 4.0])),
    "minimax": dict(model_type="minimax", hidden_size=64, intermediate_size=32, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, num_experts_per_tok=2,
                    num_local_experts=4, shared_intermediate_size=0, num_hidden_layers=2, rms_norm_eps=1e-6,
                    rope_theta=1e4, rotary_dim=8, vocab_size=VOCAB, head_dim=16),
    # Sparse layers carry a second KVCache of index keys whose values are 0 wide.
    "minimax_m3_vl": dict(model_type="minimax_m3_vl",
                          text_config=dict(model_type="minimax_m3", hidden_size=64, intermediate_size=32,
                                           dense_intermediate_size=128, shared_intermediate_size=32,
                                           num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096,
                                           head_dim=16, vocab_size=VOCAB, mlp_layer_types=["dense"] + ["sparse"] * 3,
                                           layer_types=["full_attention", "sparse_attention"] * 2,
                                           index_n_heads=2, index_head_dim=16, index_block_size=4,
                                           index_topk_blocks=2, index_local_blocks=1)),
    "ministral3": dict(model_type="ministral3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                       vocab_size=VOCAB, max_position_embeddings=128, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"] * 2,
                       rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                            original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                                            mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)),
    "mistral3": dict(model_type="mistral3",
                     text_config=dict(model_type="ministral3", hidden_size=64, num_hidden_layers=2,
                                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, rms_norm_eps=1e-5, vocab_size=VOCAB, max_position_embeddings=128,
                                      rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                           original_max_position_embeddings=32, beta_fast=32,
                                                           beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                                                           llama_4_scaling_beta=0.1))),
    "mistral4": dict(model_type="mistral4", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=16,
                     q_lora_rank=32, norm_topk_prob=True, max_position_embeddings=128, rms_norm_eps=1e-6,
                     topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, qk_rope_head_dim=8,
                     qk_nope_head_dim=16, v_head_dim=16,
                     rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                          original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                                          mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)),
    "mixtral": dict(model_type="mixtral", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=4, num_experts_per_tok=2, num_key_value_heads=2,
                    num_local_experts=4),
    "muse_glimmer": dict(model_type="muse_glimmer", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                         sliding_window=8, max_position_embeddings=4096),
    "muse_spark": dict(model_type="muse_spark",
                       text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_hidden_layers=4, vocab_size=VOCAB, rms_norm_eps=1e-5,
                                        post_norm_eps=1e-8, rope_parameters=dict(rope_theta=5e5),
                                        layer_rope_theta=[5e5, 5e5, 5e5, 0],
                                        layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                        sliding_window=8, final_logit_softcapping=20.0, output_multiplier=0.2,
                                        num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=32,
                                        moe_intermediate_size=32)),
    # Two loops over 2 layers: 4 KVCaches.
    "nanbeige": dict(model_type="nanbeige", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                     num_loops=2),
    "nanochat": dict(model_type="nanochat", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=VOCAB, intermediate_size=256),
    "nemotron": dict(model_type="nemotron", hidden_size=64, hidden_act="relu2", num_hidden_layers=2,
                     intermediate_size=128, num_attention_heads=4, norm_eps=1e-5, vocab_size=VOCAB,
                     num_key_value_heads=2),
    # Block 1 has no attention (no cache); block 2's linear attention replacement gets a KVCache it
    # never writes (offset stays 0).
    "nemotron-nas": dict(model_type="nemotron-nas", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=VOCAB,
                         block_configs=[dict(attention=dict(n_heads_in_group=2), ffn=dict(ffn_mult=2.0)),
                                        dict(attention=dict(no_op=True), ffn=dict(ffn_mult=1.5)),
                                        dict(attention=dict(replace_with_linear=True), ffn=dict(no_op=True)),
                                        dict(attention=dict(n_heads_in_group=4),
                                             ffn=dict(replace_with_linear=True))]),
    # Mamba, MLP, attention, MoE: caches only for the mamba and attention layers.
    "nemotron_h": dict(model_type="nemotron_h", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       max_position_embeddings=4096, num_attention_heads=4, num_key_value_heads=2,
                       attention_bias=False, mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False,
                       ssm_state_size=16, conv_kernel=4, n_groups=2, mlp_bias=False, layer_norm_epsilon=1e-5,
                       use_bias=False, use_conv_bias=True, hybrid_override_pattern=["M", "-", "*", "E"],
                       head_dim=16, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, n_group=1,
                       n_routed_experts=4, n_shared_experts=1, topk_group=1, num_experts_per_tok=2,
                       norm_topk_prob=True, routed_scaling_factor=1.0),
    "olmo2": dict(model_type="olmo2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB),
    "olmo3": dict(model_type="olmo3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                  max_position_embeddings=4096, sliding_window=8, rope_theta=5e5),
    "olmo_hybrid": dict(model_type="olmo_hybrid", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                        max_position_embeddings=4096, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                        linear_allow_neg_eigval=True, tie_word_embeddings=False, attention_bias=False,
                        layer_types=["linear_attention", "full_attention"] * 2),
    "olmoe": dict(model_type="olmoe", hidden_size=64, num_hidden_layers=2, intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, num_experts=4,
                  num_experts_per_tok=2),
    "openelm": dict(model_type="openelm", head_dim=16, num_transformer_layers=2, model_dim=64, vocab_size=VOCAB,
                    ffn_dim_divisor=16, num_query_heads=[4, 4], num_kv_heads=[2, 4], ffn_multipliers=[1.0, 2.0]),
    "phi": dict(model_type="phi", max_position_embeddings=2048, vocab_size=VOCAB, hidden_size=64,
                num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=4, intermediate_size=256),
    "phi3": dict(model_type="phi3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
                 max_position_embeddings=128, original_max_position_embeddings=32,
                 rope_scaling=dict(type="longrope", short_factor=[1.0] * 8, long_factor=[1.0 + i for i in range(8)])),
    # Block-sparse attention on even layers; blocksparse_block_size must be 32 or 64.
    "phi3small": dict(model_type="phi3small", hidden_size=64, dense_attention_every_n_layers=2,
                      ff_intermediate_size=128, gegelu_limit=20.0, num_hidden_layers=2, num_attention_heads=4,
                      layer_norm_epsilon=1e-5, vocab_size=VOCAB, num_key_value_heads=2, blocksparse_block_size=32,
                      blocksparse_num_local_blocks=1, blocksparse_vert_stride=2),
    "phimoe": dict(model_type="phimoe", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   original_max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2,
                   rope_scaling=dict(type="longrope", short_factor=[1.0] * 8, long_factor=[1.0 + i for i in range(8)],
                                     short_mscale=1.0, long_mscale=1.1)),
    "phixtral": dict(model_type="phixtral", num_vocab=VOCAB, model_dim=64, num_heads=4, num_layers=2,
                     rotary_dim=8, num_experts_per_tok=2, num_local_experts=4),
    "pixtral": dict(model_type="pixtral",
                    text_config=dict(model_type="mistral", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                     vocab_size=VOCAB, rope_theta=1e6)),
    "plamo": dict(model_type="plamo", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB, n_shared_head=2),
    "plamo2": dict(model_type="plamo2", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, hidden_size_per_head=16, max_position_embeddings=4096,
                   attention_window_size=8, mamba_d_state=16, mamba_d_conv=4, mamba_num_heads=4, mamba_step=2,
                   mamba_chunk_size=16, intermediate_size=128, vocab_size=VOCAB),
    "plamo3": dict(model_type="plamo3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, window_size=8,
                   sliding_window_pattern=2, intermediate_size=128, vocab_size=VOCAB),
    "prism_hadamard_qwen35": dict(model_type="qwen3_5", schema_version=1, tensor_namespace="mlx-lm-text",
                                  quantization=dict(bits=2, group_size=128, mode="affine"),
                                  # 2-bit packed MLPs; packed input widths must be multiples of 128
                                  # and Hadamard blocks >= 512 (the down_proj input).
                                  modules=[dict(path=f"model.layers.{i}.mlp.{proj}", embedding=False,
                                                dtype="float16", block=block)
                                           for i in range(4)
                                           for proj, block in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 512))],
                                  text_config=dict(model_type="qwen3_5_text", hidden_size=128, intermediate_size=512,
                                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=32, vocab_size=VOCAB, max_position_embeddings=4096,
                                                   linear_num_value_heads=4, linear_num_key_heads=2,
                                                   linear_key_head_dim=16, linear_value_head_dim=16,
                                                   linear_conv_kernel_dim=4, full_attention_interval=2,
                                                   rope_parameters=dict(type="default", mrope_section=[2, 1, 1],
                                                                        rope_theta=1e5, partial_rotary_factor=0.25))),
    "qwen": dict(model_type="qwen", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, kv_channels=16,
                 max_position_embeddings=4096, intermediate_size=256, vocab_size=VOCAB),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2,
                  tie_word_embeddings=True),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, num_experts=4,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64, rms_norm_eps=1e-6,
                      vocab_size=VOCAB),
    "qwen2_vl": dict(model_type="qwen2_vl",
                     text_config=dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                      num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB,
                                      num_key_value_heads=2)),
    "qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2,
                  max_position_embeddings=4096, head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3_5": dict(model_type="qwen3_5",
                    text_config=dict(model_type="qwen3_5_text", hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     vocab_size=VOCAB, max_position_embeddings=4096, linear_num_value_heads=4,
                                     linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                     linear_conv_kernel_dim=4, full_attention_interval=2,
                                     rope_parameters=dict(type="default", mrope_section=[2, 1, 1], rope_theta=1e5,
                                                          partial_rotary_factor=0.25))),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe",
                        text_config=dict(model_type="qwen3_5_moe_text", hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, vocab_size=VOCAB, max_position_embeddings=4096,
                                         linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                         linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                         full_attention_interval=2, num_experts=4, num_experts_per_tok=2,
                                         shared_expert_intermediate_size=32, moe_intermediate_size=32,
                                         rope_parameters=dict(type="default", mrope_section=[2, 1, 1],
                                                              rope_theta=1e5, partial_rotary_factor=0.25))),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[0], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=VOCAB,
                      num_key_value_heads=2, head_dim=16, rope_theta=1e6, tie_word_embeddings=False,
                      max_position_embeddings=4096, norm_topk_prob=True),
    "qwen3_next": dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                       num_attention_heads=4, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=32,
                       mlp_only_layers=[0], moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=VOCAB,
                       num_key_value_heads=2, rope_theta=1e4, partial_rotary_factor=0.25,
                       max_position_embeddings=4096, head_dim=16, full_attention_interval=2),
    "qwen3_vl": dict(model_type="qwen3_vl",
                     text_config=dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                      num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB,
                                      num_key_value_heads=2, max_position_embeddings=4096, head_dim=16,
                                      tie_word_embeddings=True, rope_theta=5e6)),
    "qwen3_vl_moe": dict(model_type="qwen3_vl_moe",
                         text_config=dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2,
                                          intermediate_size=128, num_attention_heads=4, num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                          moe_intermediate_size=32, rms_norm_eps=1e-6, vocab_size=VOCAB,
                                          num_key_value_heads=2, head_dim=16, rope_theta=5e6,
                                          tie_word_embeddings=False, max_position_embeddings=4096,
                                          norm_topk_prob=True)),
    "recurrent_gemma": dict(model_type="recurrent_gemma", attention_bias=False, conv1d_width=4, hidden_size=64,
                            intermediate_size=128, logits_soft_cap=30.0, num_attention_heads=4, num_hidden_layers=4,
                            num_key_value_heads=1, rms_norm_eps=1e-6, rope_theta=1e4, attention_window_size=8,
                            vocab_size=VOCAB, block_types=["recurrent", "attention"]),
    "rwkv7": dict(model_type="rwkv7", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, norm_eps=1e-5,
                  head_dim=16, num_hidden_layers=2, a_low_rank_dim=8, v_low_rank_dim=8, gate_low_rank_dim=16,
                  decay_low_rank_dim=8),
    "seed_oss": dict(model_type="seed_oss", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                     num_attention_heads=4, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2,
                     head_dim=16),
    "smollm3": dict(model_type="smollm3", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
                    no_rope_layer_interval=2),
    "solar_open": dict(model_type="solar_open", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0,
                       num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
                       partial_rotary_factor=1.0),
    "spark2_5": dict(model_type="spark2_5", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"] * 2,
                     rope_parameters=dict(sliding_attention=dict(rope_theta=1e4),
                                          full_attention=dict(rope_theta=1e6, partial_rotary_factor=0.5))),
    "stablelm": dict(model_type="stablelm", vocab_size=VOCAB, hidden_size=64, num_attention_heads=4,
                     num_hidden_layers=2, num_key_value_heads=2, intermediate_size=128, rope_theta=1e4,
                     use_qkv_bias=True, partial_rotary_factor=0.25, layer_norm_eps=1e-5),
    "starcoder2": dict(model_type="starcoder2", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB),
    "step3p5": dict(model_type="step3p5", hidden_size=64, num_hidden_layers=4, vocab_size=VOCAB,
                    num_attention_heads=4, num_attention_groups=2, head_dim=16, intermediate_size=128,
                    max_position_embeddings=4096, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    attention_other_setting=dict(num_attention_heads=2, num_attention_groups=1),
                    moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32, share_expert_dim=32,
                    moe_layers_enum="1,2,3", swiglu_limits=[0, 0, 7.0, 7.0]),
    "talkie": dict(model_type="talkie", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                   intermediate_size=128, vocab_size=VOCAB),
    "telechat3": dict(model_type="telechat3", hidden_size=64, intermediate_size=128, max_position_embeddings=4096,
                      num_attention_heads=4, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                      vocab_size=VOCAB, rope_theta=1e4),
    "youtu_llm": dict(model_type="youtu_llm", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                      q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16),
}

# The type names of make_prompt_cache(build(name)), one per cache, a CacheList with its parts.
CACHE_TYPES: dict[str, tuple[str, ...]] = {
    "Klear": ("KVCache", "KVCache"),
    "afm7": ("KVCache", "KVCache"),
    "afmoe": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "apertus": ("KVCache", "KVCache"),
    "baichuan_m1": ("CacheList(ArraysCache,RotatingKVCache)", "CacheList(ArraysCache,KVCache)"),
    "bailing_hybrid": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "bailing_moe": ("KVCache", "KVCache"),
    "bailing_moe_linear": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "bailing_moe_v3": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "bitnet": ("KVCache", "KVCache"),
    "cohere": ("KVCache", "KVCache"),
    "cohere2": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "dbrx": ("KVCache", "KVCache"),
    "deepseek": ("KVCache", "KVCache"),
    "deepseek_v2": ("KVCache", "KVCache"),
    "deepseek_v3": ("KVCache", "KVCache"),
    "deepseek_v32": ("CacheList(KVCache,KVCache)", "CacheList(KVCache,KVCache)"),
    "deepseek_v41": ("LayerCache", "LayerCache", "LayerCache", "LayerCache"),
    "dots1": ("KVCache", "KVCache"),
    "ernie4_5": ("KVCache", "KVCache"),
    "ernie4_5_moe": ("KVCache", "KVCache"),
    "exaone": ("KVCache", "KVCache"),
    "exaone4": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "exaone_moe": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "falcon_h1": ("CacheList(ArraysCache,KVCache)", "CacheList(ArraysCache,KVCache)"),
    "gear": ("ArraysCache", "RotatingKVCache", "ArraysCache", "KVCache"),
    "gemma": ("KVCache", "KVCache"),
    "gemma2": ("KVCache", "KVCache"),
    "gemma3": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "gemma3_text": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "gemma3n": ("RotatingKVCache", "KVCache"),
    "gemma4": ("RotatingKVCache", "KVCache"),
    "gemma4_text": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "glm": ("KVCache", "KVCache"),
    "glm4": ("KVCache", "KVCache"),
    "glm4_moe": ("KVCache", "KVCache"),
    "glm4_moe_lite": ("KVCache", "KVCache"),
    "glm_moe_dsa": ("CacheList(KVCache,KVCache)", "CacheList(KVCache,KVCache)"),
    "gpt2": ("KVCache", "KVCache"),
    "gpt_bigcode": ("KVCache", "KVCache"),
    "gpt_neox": ("KVCache", "KVCache"),
    "gpt_oss": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "gptj": ("KVCache", "KVCache"),
    "granite": ("KVCache", "KVCache"),
    "granitemoe": ("KVCache", "KVCache"),
    "granitemoehybrid": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "helium": ("KVCache", "KVCache"),
    "hunyuan": ("KVCache", "KVCache"),
    "hunyuan_v1_dense": ("KVCache", "KVCache"),
    "internlm2": ("KVCache", "KVCache"),
    "internlm3": ("KVCache", "KVCache"),
    "iquestloopcoder": ("KVCache", "KVCache", "RotatingKVCache", "RotatingKVCache"),
    "jamba": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "kimi_k25": ("KVCache", "KVCache"),
    "kimi_k3": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "kimi_linear": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "kimi_vl": ("KVCache", "KVCache"),
    "laguna": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "lfm2": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "lfm2-vl": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "lfm2_moe": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "lille-130m": ("KVCache", "KVCache"),
    "llama": ("KVCache", "KVCache"),
    "llama4": ("ChunkedKVCache", "ChunkedKVCache", "ChunkedKVCache", "KVCache"),
    "llama4_text": ("KVCache", "KVCache", "KVCache", "KVCache"),
    "longcat_flash": ("CacheList(KVCache,KVCache)", "CacheList(KVCache,KVCache)"),
    "longcat_flash_ngram": ("ArraysCache", "CacheList(KVCache,KVCache)", "CacheList(KVCache,KVCache)"),
    "mamba": ("ArraysCache", "ArraysCache"),
    "mamba2": ("ArraysCache", "ArraysCache"),
    "mellum": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "mimo": ("KVCache", "KVCache"),
    "mimo_v2_flash": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "minicpm": ("KVCache", "KVCache"),
    "minicpm3": ("KVCache", "KVCache"),
    "minimax": ("KVCache", "KVCache"),
    "minimax_m3_vl": (
        "CacheList(KVCache)", "CacheList(KVCache,KVCache)", "CacheList(KVCache)", "CacheList(KVCache,KVCache)",
    ),
    "ministral3": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "mistral3": ("KVCache", "KVCache"),
    "mistral4": ("KVCache", "KVCache"),
    "mixtral": ("KVCache", "KVCache"),
    "muse_glimmer": ("RotatingKVCache", "RotatingKVCache", "RotatingKVCache", "KVCache"),
    "muse_spark": ("RotatingKVCache", "RotatingKVCache", "RotatingKVCache", "KVCache"),
    "nanbeige": ("KVCache", "KVCache", "KVCache", "KVCache"),
    "nanochat": ("KVCache", "KVCache"),
    "nemotron": ("KVCache", "KVCache"),
    "nemotron-nas": ("KVCache", "KVCache", "KVCache"),
    "nemotron_h": ("ArraysCache", "KVCache"),
    "olmo2": ("KVCache", "KVCache"),
    "olmo3": ("RotatingKVCache", "RotatingKVCache", "RotatingKVCache", "KVCache"),
    "olmo_hybrid": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "olmoe": ("KVCache", "KVCache"),
    "openelm": ("KVCache", "KVCache"),
    "phi": ("KVCache", "KVCache"),
    "phi3": ("KVCache", "KVCache"),
    "phi3small": ("KVCache", "KVCache"),
    "phimoe": ("KVCache", "KVCache"),
    "phixtral": ("KVCache", "KVCache"),
    "pixtral": ("KVCache", "KVCache"),
    "plamo": ("KVCache", "KVCache"),
    "plamo2": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "plamo3": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "prism_hadamard_qwen35": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "qwen": ("KVCache", "KVCache"),
    "qwen2": ("KVCache", "KVCache"),
    "qwen2_moe": ("KVCache", "KVCache"),
    "qwen2_vl": ("KVCache", "KVCache"),
    "qwen3": ("KVCache", "KVCache"),
    "qwen3_5": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "qwen3_5_moe": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "qwen3_moe": ("KVCache", "KVCache"),
    "qwen3_next": ("ArraysCache", "KVCache", "ArraysCache", "KVCache"),
    "qwen3_vl": ("KVCache", "KVCache"),
    "qwen3_vl_moe": ("KVCache", "KVCache"),
    "recurrent_gemma": ("ArraysCache", "RotatingKVCache", "ArraysCache", "RotatingKVCache"),
    "rwkv7": ("ArraysCache", "ArraysCache"),
    "seed_oss": ("KVCache", "KVCache"),
    "smollm3": ("KVCache", "KVCache", "KVCache", "KVCache"),
    "solar_open": ("KVCache", "KVCache"),
    "spark2_5": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "stablelm": ("KVCache", "KVCache"),
    "starcoder2": ("KVCache", "KVCache"),
    "step3p5": ("RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"),
    "talkie": ("KVCache", "KVCache"),
    "telechat3": ("KVCache", "KVCache"),
    "youtu_llm": ("KVCache", "KVCache"),
}

# Families whose last-position logits for a cold 60-token prefill in one call differ by more than
# 1e-4 (max abs) from the same prompt prefilled as [0:23], [23:41], [41:60] on a fresh
# make_prompt_cache(model). The other families agree to < 1e-5 chunked, and to < 2e-5 when the prompt is
# fed one token at a time. No family's make_cache uses RotatingKVCache(keep > 0): keep=4 only
# comes from make_prompt_cache(model, max_kv_size=...) on a model without make_cache.
CHUNK_VARIANT: dict[str, str] = {
    "phi3small": (
        "max abs diff 2.0e-3 (3.3e-3 fed token by token). Its block-sparse attention layers (layer_idx % "
        "dense_attention_every_n_layers == 0) compute the scores by hand and add the mask: `scores + mask` with "
        "the boolean causal mask from create_attention_mask(..., return_array=True) adds 1.0 to allowed keys "
        "instead of masking the rest, so only the block mask (32-token blocks, aligned to the end of the keys) "
        "limits attention and a prompt token attends to the later tokens of its block in the same call: "
        "logits at position 10 of a 20-token prompt differ by 5e-2 from those of a 40-token prompt. A bug of "
        "mlx-lm's phi3small, not of the cache."
    ),
    "plamo3": (
        "max abs diff 1.0e-1 (6.8e-1 fed token by token). Its sliding layers mask with window_size + 1 "
        "(create_attention_mask(..., window_size=self.window_size + 1)) but make_cache gives them "
        "RotatingKVCache(max_size=window_size): a one-call prefill attends to window + 1 keys, while after a "
        "chunk boundary or in decode the rotating cache holds only window keys. Agrees (1.3e-6) when "
        "window_size exceeds the prompt."
    ),
}

SKIPPED: dict[str, str] = {
    "activations": "helper module, no Model: activation functions (swiglu, SwigluOAI, xielu).",
    "base": "helper module, no Model: BaseModelArgs, attention masks, scaled_dot_product_attention.",
    "bitlinear_layers": "helper module, no Model: BitLinear and its Metal kernel (used by bitnet).",
    "cache": "helper module, no Model: the cache classes, make_prompt_cache, save/load.",
    "gated_delta": "helper module, no Model: gated delta rule ops and kernels (qwen3_next, qwen3_5, kimi, ...).",
    "mla": "helper module, no Model: MultiLinear / QuantizedMultiLinear for MLA attention.",
    "olmo": (
        "cannot prefill more than one token. Importing it calls sys.exit(1) unless the ai2-olmo package "
        "(`import hf_olmo`, only an availability probe) is installed; with an empty stand-in hf_olmo module "
        "it imports and builds, and single-token calls run, but any prompt of 2+ tokens raises "
        "`ValueError: Cannot perform inplace addition on an mlx.core.array and str`: Attention.attend does "
        "`scores += mask` and create_attention_mask returns the string 'causal' for N > 1 (a boolean array "
        "mask would be added as 0/1 and not mask either). A bug of mlx-lm's olmo module."
    ),
    "pipeline": "helper module, no Model: PipelineMixin for pipeline parallelism.",
    "rope_utils": "helper module, no Model: RoPE variants and initialize_rope.",
    "ssm": "helper module, no Model: Mamba-2 SSM ops and kernels.",
    "switch_layers": "helper module, no Model: SwitchLinear / SwitchGLU mixture-of-experts layers.",
}


def module(name: str) -> types.ModuleType:
    """Import ``mlx_lm.models.<name>`` (names with a dash too)."""
    return importlib.import_module(f"mlx_lm.models.{name}")


def cache_type_names(caches) -> tuple[str, ...]:
    """Type names of a prompt cache, a CacheList spelled with its parts: "CacheList(ArraysCache,KVCache)"."""
    out = []
    for c in caches:
        if type(c).__name__ == "CacheList":
            out.append("CacheList(" + ",".join(cache_type_names(c.caches)) + ")")
        else:
            out.append(type(c).__name__)
    return tuple(out)


def build(name: str, **overrides) -> nn.Module:
    """A tiny random float32 model of family ``name`` (deterministic: same seed, same weights)."""
    mod = module(name)
    mx.random.seed(0)
    # Deep copy: some ModelArgs.__post_init__ write into their nested text_config dict.
    config = copy.deepcopy({**FAMILIES[name], **overrides})
    model = mod.Model(mod.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    if name in _FIXUPS:
        _FIXUPS[name](model, mod)
    mx.eval(model.parameters())
    return model


def _uniform(shape: tuple[int, ...], fan_in: int) -> mx.array:
    bound = fan_in**-0.5
    return mx.random.uniform(-bound, bound, shape)


def _fix_bitnet(model: nn.Module, mod: types.ModuleType) -> None:
    # BitLinear weights start as all-zero packed bytes, which decode to all -1: every
    # output channel is the same, so the logits are flat. Draw random ternary weights
    # (four 2-bit codes in {0, 1, 2} per byte, decoded as code - 1) and a 1/sqrt(fan_in)
    # scale. Its matmul is a Metal-only kernel ("[metal_kernel] No Metal back-end" on
    # CPU); without Metal, use the same arithmetic in plain MLX.
    from mlx_lm.models.bitlinear_layers import BitLinear

    for _, layer in model.named_modules():
        if isinstance(layer, BitLinear):
            codes = mx.random.randint(0, 3, (4, *layer.weight.shape)).astype(mx.uint8)
            layer.weight = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
            layer.weight_scale = mx.array([layer.in_features**-0.5])
            if not mx.metal.is_available():
                layer.execute_matmul_kernel = types.MethodType(_bitlinear_matmul, layer)


def _bitlinear_matmul(layer: nn.Module, x: mx.array, packed: mx.array) -> mx.array:
    """bitlinear_layers' Metal kernel in plain MLX: packed row r, bits 2i..2i+1 hold
    output channel i * out_features / 4 + r as code - 1."""
    w = mx.concatenate([((packed >> (2 * i)) & 3).astype(x.dtype) - 1 for i in range(4)], axis=0)
    scale = 1 / layer.weight_scale if layer.invert_weight_scales else layer.weight_scale
    return (x @ w[: layer.out_features].T) * scale.astype(x.dtype)


def _fix_muse_spark(model: nn.Module, mod: types.ModuleType) -> None:
    # muse_spark calls seven fused Metal kernels from mlx_lm.kernels, which raise
    # "[metal_kernel] No Metal back-end" on CPU. Without Metal, rebind the names in the
    # muse_spark module to plain-MLX versions of the same arithmetic (as their
    # docstrings and sources state it). This patches the module for the whole process.
    if not mx.metal.is_available():
        for fn in (_expert_routing, _norm_add_norm, _post_expert_norm_combine, _pre_norm, _qk_norm,
                   _qk_norm_rope, _rms_norm_sigmoid_gate):
            setattr(mod, fn.__name__[1:], fn)


def _rms(x: mx.array, eps: float) -> mx.array:
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)


def _expert_routing(logits, expert_bias, *, top_k, multiplier, score_eps, route_scale):
    scores = mx.sigmoid(logits.astype(mx.float32) * multiplier)
    biased = scores + expert_bias
    inds, weights = [], []
    for _ in range(top_k):  # the highest biased score first, the lower index on a tie
        i = mx.argmax(biased, axis=-1, keepdims=True)
        inds.append(i)
        weights.append(mx.take_along_axis(scores, i, axis=-1))
        biased = mx.where(mx.arange(biased.shape[-1]) == i, -mx.inf, biased)
    w = mx.concatenate(weights, axis=-1)
    w = w / (mx.sum(w, axis=-1, keepdims=True) + score_eps) * route_scale
    return [mx.concatenate(inds, axis=-1).astype(mx.uint32), w]


def _norm_add_norm(branch, stream, *, alpha, beta, post_weight, post_eps, next_norm):
    v = branch.astype(mx.float32)
    if post_weight is not None:
        v = (post_weight.astype(branch.dtype) * branch).astype(mx.float32)
    new_stream = alpha * stream + beta * _rms(v, post_eps).astype(branch.dtype).astype(mx.float32)
    if next_norm is None:
        return new_stream, None
    return new_stream, (_rms(new_stream, next_norm.eps) * next_norm.weight).astype(branch.dtype)


def _pre_norm(stream, norm, *, dtype):
    return (_rms(stream, norm.eps) * norm.weight).astype(dtype)


def _post_expert_norm_combine(experts, weights, *, norm_weight, eps):
    v = experts.astype(mx.float32) * norm_weight
    w = weights.astype(experts.dtype).astype(mx.float32)
    return mx.sum(_rms(v, eps) * w[..., None], axis=-2).astype(experts.dtype)


def _qk_norm(qkvg, *, n_heads, n_kv_heads, head_dim, eps, query_scale):
    x = qkvg[..., : (n_heads + n_kv_heads) * head_dim]
    y = _rms(x.reshape(*x.shape[:-1], n_heads + n_kv_heads, head_dim).astype(mx.float32), eps)
    y = y.astype(qkvg.dtype)
    q = (y[..., :n_heads, :].astype(mx.float32) * query_scale).astype(qkvg.dtype)
    return [q, y[..., n_heads:, :]]


def _qk_norm_rope(qkvg, *, n_heads, n_kv_heads, head_dim, eps, query_scale, rope_base, offset):
    q, k = _qk_norm(qkvg, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, eps=eps,
                    query_scale=query_scale)

    def rope(x):  # (B, L, H, D) -> rotate as mx.fast.rope(traditional=True) over L
        x = mx.fast.rope(x.swapaxes(-3, -2), head_dim, traditional=True, base=rope_base, scale=1.0,
                         offset=offset)
        return x.swapaxes(-3, -2)

    return [rope(q), rope(k)]


def _rms_norm_sigmoid_gate(x, gate, *, eps):
    B, H, L, D = x.shape
    y = _rms(x.astype(mx.float32).transpose(0, 2, 1, 3), eps)
    y = y * mx.sigmoid(gate.astype(mx.float32).reshape(B, L, H, D))
    return y.reshape(B, L, H * D).astype(x.dtype)


def _fix_phi3small(model: nn.Module, mod: types.ModuleType) -> None:
    # Model.__call__ writes -inf at the tokenizer's dummy ids 100256..100351, which are
    # out of range for a 261-token vocab (an unchecked scatter: it corrupts the heap,
    # "double free or corruption"). Mask no ids.
    model._dummy_tokenizer_ids = mx.array([], dtype=mx.int32)


def _fix_prism_hadamard_qwen35(model: nn.Module, mod: types.ModuleType) -> None:
    # The packed 2-bit layers start with zero weights, scales and biases (they output 0).
    # Quantize random weights into them, and draw random +-1 Hadamard signs.
    for _, layer in model.named_modules():
        if isinstance(layer, mod.HadamardQuantizedLinear):
            rows, width = layer.scales.shape[0], layer.scales.shape[1] * layer.group_size
            w = _uniform((rows, width), width)
            layer.weight, layer.scales, layer.biases = mx.quantize(w, group_size=layer.group_size, bits=layer.bits)
            if layer.block:
                layer.signs = mx.where(mx.random.bernoulli(0.5, (width,)), 1.0, -1.0)


def _fix_talkie(model: nn.Module, mod: types.ModuleType) -> None:
    # The output projection is a bare zero-initialised array (the logits are all 0).
    model.lm_head = _uniform(model.lm_head.shape, model.lm_head.shape[1])


_FIXUPS = {
    "bitnet": _fix_bitnet,
    "muse_spark": _fix_muse_spark,
    "phi3small": _fix_phi3small,
    "prism_hadamard_qwen35": _fix_prism_hadamard_qwen35,
    "talkie": _fix_talkie,
}
