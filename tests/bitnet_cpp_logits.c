/* Logits of a token sequence from bitnet.cpp's libllama (its 2025-26 API): argv[1] the GGUF, argv[2] a file of
 * token ids. The tokens go in one at a time, as in decode; each position's logits are printed as one line. */
#include <stdio.h>

#include "llama.h"

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    llama_backend_init();
    struct llama_model *model = llama_load_model_from_file(argv[1], llama_model_default_params());
    if (!model) return 3;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_threads = cp.n_threads_batch = 1;
    struct llama_context *ctx = llama_new_context_with_model(model, cp);
    FILE *in = fopen(argv[2], "r");
    if (!ctx || !in) return 4;
    const int n_vocab = llama_n_vocab(model);
    llama_token token;
    for (llama_pos pos = 0; fscanf(in, "%d", &token) == 1; pos++) {
        if (llama_decode(ctx, llama_batch_get_one(&token, 1, pos, 0))) return 5;
        const float *logits = llama_get_logits_ith(ctx, -1);
        for (int i = 0; i < n_vocab; i++) printf("%.9g%c", logits[i], i + 1 < n_vocab ? ' ' : '\n');
    }
    return 0;
}
