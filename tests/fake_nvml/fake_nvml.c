/* A fake libnvidia-ml.so.1 for testing the pynvml code path on a machine
 * without a GPU: the handful of NVML entry points Baton calls, answering from
 * the environment. FAKE_NVML_GPUS devices (default 1), each with
 * FAKE_NVML_TOTAL bytes (default 80 GiB) of which device i uses
 * FAKE_NVML_USED * (i + 1) bytes (default 1 GiB). Not NVIDIA's code: the
 * signatures follow the public NVML API reference.
 *   cc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */
#include <stdlib.h>

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef void *nvmlDevice_t;

static unsigned long long env_ull(const char *name, unsigned long long fallback) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : fallback;
}

int nvmlInitWithFlags(unsigned int flags) { (void)flags; return 0; }
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(int result) { (void)result; return "fake NVML error"; }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    *count = (unsigned int)env_ull("FAKE_NVML_GPUS", 1);
    return 0;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (index >= env_ull("FAKE_NVML_GPUS", 1)) return 2; /* NVML_ERROR_INVALID_ARGUMENT */
    *device = (nvmlDevice_t)(unsigned long)(index + 1);
    return 0;
}

int nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    unsigned long long index = (unsigned long)device - 1;
    memory->total = env_ull("FAKE_NVML_TOTAL", 80ULL << 30);
    memory->used = env_ull("FAKE_NVML_USED", 1ULL << 30) * (index + 1);
    memory->free = memory->total - memory->used;
    return 0;
}
