// The emulator build of rowwise_cuda.cu (see cuda_sim.h).
#include "cuda_sim.h"

#include "../rowwise_cuda.cu"
