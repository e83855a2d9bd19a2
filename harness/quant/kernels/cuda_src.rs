//! The CUDA C source of the 4-bit kernels (dequantize, `x·Wᵀ`, `g·W`, with the weight
//! rounding of [`super::Rounding`]) and its compilation to PTX with NVRTC (feature `nvrtc`,
//! which `cuda` includes). NVRTC needs no GPU, so CI compiles this source on machines without
//! one (`tests/cuda_source.rs`); the `cuda` module (feature `cuda`) launches it where a GPU
//! exists.

/// The kernels' entry points.
pub const KERNELS: [&str; 3] = ["tc_q4_nt", "tc_q4_nn", "tc_q4_dequant"];

/// CUDA C for NVRTC: no headers; the f16 cast is the PTX instruction `cuda_fp16.h` uses.
pub const SOURCE: &str = r#"
// v cast to f32 (r = 0), bf16 (1) or f16 (2) and back, round to nearest even.
extern "C" __device__ __forceinline__ float tc_round(float v, int r) {
    if (r == 1) {
        unsigned int b = __float_as_uint(v);
        if ((b & 0x7fffffffu) > 0x7f800000u) return __uint_as_float((b | 0x00400000u) & 0xffff0000u);
        return __uint_as_float((b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u);
    }
    if (r == 2) {
        unsigned short h;
        float o;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        asm("cvt.f32.f16 %0, %1;" : "=f"(o) : "h"(h));
        return o;
    }
    return v;
}

// round(code[q(f)] * scale(f)) through the casts r0 then r1.
extern "C" __device__ __forceinline__ float tc_w(const unsigned char* packed, const float* scales,
                                                 const float* tab, long long f, int blocksize,
                                                 int r0, int r1) {
    unsigned char b = packed[f >> 1];
    int q = (f & 1) ? (b & 15) : (b >> 4);
    return tc_round(tc_round(tab[q] * scales[f / blocksize], r0), r1);
}

// y[m, o] = sum_k x[m, k] * W[o, k]; grid (rows, min(M, 65535)), 128 threads.
extern "C" __global__ void tc_q4_nt(const float* x, const unsigned char* packed, const float* scales,
                                    const float* code, int blocksize, int r0, int r1, int rows, int cols,
                                    int m, float* y) {
    __shared__ float tab[16];
    __shared__ float part[32];
    if (threadIdx.x < 16) tab[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    int o = blockIdx.x;
    long long base = (long long)o * cols;
    for (int mi = blockIdx.y; mi < m; mi += gridDim.y) {
        const float* xr = x + (long long)mi * cols;
        float acc = 0.f;
        for (int k = threadIdx.x; k < cols; k += blockDim.x) {
            acc = fmaf(tc_w(packed, scales, tab, base + k, blocksize, r0, r1), xr[k], acc);
        }
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = acc;
        __syncthreads();
        if (threadIdx.x == 0) {
            float s = 0.f;
            for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += part[w];
            y[(long long)mi * rows + o] = s;
        }
        __syncthreads();
    }
}

// dx[m, i] = sum_o g[m, o] * W[o, i]; grid (ceil(cols / 256), min(M, 65535)), 256 threads.
extern "C" __global__ void tc_q4_nn(const float* g, const unsigned char* packed, const float* scales,
                                    const float* code, int blocksize, int r0, int r1, int rows, int cols,
                                    int m, float* dx) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    for (int mi = blockIdx.y; mi < m; mi += gridDim.y) {
        const float* gr = g + (long long)mi * rows;
        float acc = 0.f;
        for (int o = 0; o < rows; ++o) {
            acc = fmaf(gr[o], tc_w(packed, scales, tab, (long long)o * cols + i, blocksize, r0, r1), acc);
        }
        dx[(long long)mi * cols + i] = acc;
    }
}

// out[f] = round(code[q(f)] * scale(f)); grid-stride, 256 threads.
extern "C" __global__ void tc_q4_dequant(const unsigned char* packed, const float* scales, const float* code,
                                         int blocksize, int r0, int r1, long long n, float* out) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    for (long long f = (long long)blockIdx.x * blockDim.x + threadIdx.x; f < n; f += (long long)gridDim.x * blockDim.x) {
        out[f] = tc_w(packed, scales, tab, f, blocksize, r0, r1);
    }
}
"#;

/// Compile [`SOURCE`] to PTX with NVRTC (loaded at run time; its log on failure).
#[cfg(feature = "nvrtc")]
pub fn compile() -> Result<String, String> {
    cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
}
