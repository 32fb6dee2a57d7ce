/*
 * Run one layer exported by `autoconv export --reference` with plain C and OpenCL, no Python:
 * read the launch description from the export's autoconv_kernels.h, build the exported kernel
 * sources, run them on the first OpenCL device that builds them, and compare the output with
 * the float64 reference autoconv wrote (relative error < 1e-4).
 *
 *   gcc -std=c99 -O2 -I EXPORT_DIR run_layer.c -lOpenCL -o run_layer
 *   ./run_layer EXPORT_DIR [LAYER_NAME]     (default: every exported layer)
 *
 * Before running a layer it recomputes the layer's checksum (FNV-1a 64 over its launch
 * description and the bytes of its kernel files) and refuses a header that does not match the
 * kernel files beside it (a stale header, an edited buffer size), instead of running them.
 *
 * Exit code 0 when every layer matches, 1 on a mismatch, 2 on any other error.
 */
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "autoconv_kernels.h"

#define CHECK(call, what)                                                       \
    do {                                                                        \
        cl_int err_ = (call);                                                   \
        if (err_ != CL_SUCCESS) {                                               \
            fprintf(stderr, "error: %s failed (OpenCL error %d)\n", what, err_); \
            exit(2);                                                            \
        }                                                                       \
    } while (0)

static char *read_file(const char *dir, const char *name, size_t *size) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "error: cannot open %s\n", path);
        exit(2);
    }
    fseek(f, 0, SEEK_END);
    long length = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc((size_t)length + 1);
    if (!data || fread(data, 1, (size_t)length, f) != (size_t)length) {
        fprintf(stderr, "error: cannot read %s\n", path);
        exit(2);
    }
    data[length] = '\0';
    fclose(f);
    *size = (size_t)length;
    return data;
}

static unsigned long long fnv1a64(const void *data, size_t size, unsigned long long state) {
    const unsigned char *bytes = data;
    for (size_t i = 0; i < size; ++i) {
        state ^= bytes[i];
        state *= 0x100000001b3ULL;
    }
    return state;
}

/* Hash one formatted piece of the description (the same text autoconv's export.py formats). */
static unsigned long long hash_text(unsigned long long state, const char *format, ...) {
    char piece[8192];
    va_list args;
    va_start(args, format);
    int length = vsnprintf(piece, sizeof piece, format, args);
    va_end(args);
    if (length < 0 || (size_t)length >= sizeof piece) {
        fprintf(stderr, "error: a launch description field is too long\n");
        exit(2);
    }
    return fnv1a64(piece, (size_t)length, state);
}

static void check_layer(const char *dir, const autoconv_layer *layer) {
    unsigned long long state = 0xcbf29ce484222325ULL;
    state = hash_text(state, "%s|%d %d %d %d %d %d %d %d %d %d %d|%zu %zu %zu %zu %zu %zu|%d", layer->key, layer->n,
                      layer->c, layer->h, layer->w, layer->k, layer->r, layer->s, layer->p, layer->q, layer->groups,
                      layer->has_bias, layer->input_bytes, layer->weight_bytes, layer->bias_bytes,
                      layer->output_bytes, layer->scratch_bytes, layer->residual_bytes, layer->num_kernels);
    for (int i = 0; i < layer->num_kernels; ++i) {
        const autoconv_kernel *k = &layer->kernels[i];
        state = hash_text(state, "|%s|%s|%zu %zu %zu|%zu %zu %zu|%d", k->file, k->entry, k->global_size[0],
                          k->global_size[1], k->global_size[2], k->local_size[0], k->local_size[1],
                          k->local_size[2], k->num_args);
        for (int a = 0; a < k->num_args; ++a)
            state = hash_text(state, ";%s:%d:%d", k->args[a].name, k->args[a].kind, k->args[a].value);
    }
    for (int i = 0; i < layer->num_kernels; ++i) {
        size_t size;
        char *source = read_file(dir, layer->kernels[i].file, &size);
        state = fnv1a64(source, size, state);
        free(source);
    }
    if (state != layer->checksum) {
        fprintf(stderr, "error: %s: autoconv_kernels.h does not match the kernel files in %s (checksum %016llx, "
                "header says %016llx); use the header from the same export\n", layer->name, dir, state,
                layer->checksum);
        exit(2);
    }
}

static float *read_floats(const char *dir, const char *name, size_t expected_bytes) {
    size_t size;
    char *data = read_file(dir, name, &size);
    if (size != expected_bytes) {
        fprintf(stderr, "error: %s has %zu bytes, expected %zu\n", name, size, expected_bytes);
        exit(2);
    }
    return (float *)data;
}

static int run_layer(const char *dir, const autoconv_layer *layer, cl_context context, cl_device_id device,
                     cl_command_queue queue) {
    if (!layer->reference_input || !layer->reference_expected) {
        fprintf(stderr, "error: %s was exported without --reference data\n", layer->name);
        exit(2);
    }
    check_layer(dir, layer);
    float *input = read_floats(dir, layer->reference_input, layer->input_bytes);
    float *weight = read_floats(dir, layer->reference_weight, layer->weight_bytes);
    float *bias = layer->has_bias ? read_floats(dir, layer->reference_bias, layer->bias_bytes) : NULL;
    /* A fused epilogue's residual operand: added to the output before the activation. */
    float *residual = layer->residual_bytes ? read_floats(dir, layer->reference_residual, layer->residual_bytes) : NULL;
    float *expected = read_floats(dir, layer->reference_expected, layer->output_bytes);
    float *output = malloc(layer->output_bytes);
    size_t count = layer->output_bytes / sizeof(float);
    for (size_t i = 0; i < count; ++i) output[i] = NAN; /* poison: an unwritten element shows */

    cl_int err;
    cl_mem buffers[AUTOCONV_NUM_ARG_KINDS] = {0};
    buffers[AUTOCONV_ARG_INPUT] = clCreateBuffer(context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, layer->input_bytes, input, &err);
    CHECK(err, "input buffer");
    buffers[AUTOCONV_ARG_WEIGHT] = clCreateBuffer(context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, layer->weight_bytes, weight, &err);
    CHECK(err, "weight buffer");
    buffers[AUTOCONV_ARG_BIAS] = clCreateBuffer(context, CL_MEM_READ_ONLY | (bias ? CL_MEM_COPY_HOST_PTR : 0), layer->bias_bytes, bias, &err);
    CHECK(err, "bias buffer");
    buffers[AUTOCONV_ARG_OUTPUT] = clCreateBuffer(context, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, layer->output_bytes, output, &err);
    CHECK(err, "output buffer");
    if (layer->scratch_bytes) { /* algorithms without a scratch buffer (implicit GEMM, direct) have none */
        buffers[AUTOCONV_ARG_SCRATCH] = clCreateBuffer(context, CL_MEM_READ_WRITE, layer->scratch_bytes, NULL, &err);
        CHECK(err, "scratch buffer");
    }
    if (residual) {
        buffers[AUTOCONV_ARG_RESIDUAL] = clCreateBuffer(context, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                                        layer->residual_bytes, residual, &err);
        CHECK(err, "residual buffer");
    }

    for (int i = 0; i < layer->num_kernels; ++i) {
        const autoconv_kernel *k = &layer->kernels[i];
        size_t length;
        char *source = read_file(dir, k->file, &length);
        const char *sources[1] = {source};
        cl_program program = clCreateProgramWithSource(context, 1, sources, &length, &err);
        CHECK(err, "clCreateProgramWithSource");
        if (clBuildProgram(program, 1, &device, "-cl-mad-enable", NULL, NULL) != CL_SUCCESS) {
            char log[16384];
            clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, sizeof log, log, NULL);
            fprintf(stderr, "error: %s failed to build:\n%s\n", k->file, log);
            exit(2);
        }
        cl_kernel kernel = clCreateKernel(program, k->entry, &err);
        CHECK(err, k->entry);
        for (int a = 0; a < k->num_args; ++a) {
            const autoconv_arg *arg = &k->args[a];
            if (arg->kind == AUTOCONV_ARG_INT) {
                cl_int value = arg->value;
                CHECK(clSetKernelArg(kernel, (cl_uint)a, sizeof value, &value), arg->name);
            } else {
                CHECK(clSetKernelArg(kernel, (cl_uint)a, sizeof(cl_mem), &buffers[arg->kind]), arg->name);
            }
        }
        int has_local = k->local_size[0] != 0;
        CHECK(clEnqueueNDRangeKernel(queue, kernel, 3, NULL, k->global_size, has_local ? k->local_size : NULL,
                                     0, NULL, NULL), k->entry);
        clReleaseKernel(kernel);
        clReleaseProgram(program);
        free(source);
    }
    CHECK(clEnqueueReadBuffer(queue, buffers[AUTOCONV_ARG_OUTPUT], CL_TRUE, 0, layer->output_bytes, output, 0, NULL, NULL),
          "reading the output");

    double max_diff = 0.0, max_ref = 0.0;
    size_t unwritten = 0;
    for (size_t i = 0; i < count; ++i) {
        if (!isfinite(output[i])) { ++unwritten; continue; }
        double diff = fabs((double)output[i] - (double)expected[i]);
        if (diff > max_diff) max_diff = diff;
        if (fabs((double)expected[i]) > max_ref) max_ref = fabs((double)expected[i]);
    }
    double rel = max_ref > 0 ? max_diff / max_ref : max_diff;
    int ok = unwritten == 0 && rel < 1e-4;
    printf("%s %s: %s, %d kernel(s), relative error %.2e, %zu unwritten -> %s\n", layer->name, layer->key,
           layer->layout, layer->num_kernels, rel, unwritten, ok ? "OK" : "MISMATCH");
    for (int b = 1; b < AUTOCONV_NUM_ARG_KINDS; ++b) if (buffers[b]) clReleaseMemObject(buffers[b]);
    free(input); free(weight); free(bias); free(residual); free(expected); free(output);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s EXPORT_DIR [LAYER_NAME]\n", argv[0]);
        return 2;
    }
    cl_platform_id platforms[8];
    cl_uint num_platforms = 0;
    CHECK(clGetPlatformIDs(8, platforms, &num_platforms), "clGetPlatformIDs");
    cl_device_id device = NULL;
    for (cl_uint p = 0; p < num_platforms && !device; ++p) {
        cl_uint n = 0;
        if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, 1, &device, &n) != CL_SUCCESS || n == 0) device = NULL;
    }
    if (!device) {
        fprintf(stderr, "error: no OpenCL device found\n");
        return 2;
    }
    cl_int err;
    cl_context context = clCreateContext(NULL, 1, &device, NULL, NULL, &err);
    CHECK(err, "clCreateContext");
    cl_command_queue queue = clCreateCommandQueue(context, device, 0, &err);
    CHECK(err, "clCreateCommandQueue");

    int all_ok = 1, ran = 0;
    for (int i = 0; i < AUTOCONV_NUM_LAYERS; ++i) {
        if (argc > 2 && strcmp(argv[2], autoconv_layers[i].name) != 0) continue;
        all_ok &= run_layer(argv[1], &autoconv_layers[i], context, device, queue);
        ++ran;
    }
    clReleaseCommandQueue(queue);
    clReleaseContext(context);
    if (!ran) {
        fprintf(stderr, "error: no exported layer is named %s\n", argv[2]);
        return 2;
    }
    return all_ok ? 0 : 1;
}
