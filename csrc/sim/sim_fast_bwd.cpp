// The emulator build of rowwise_fast_bwd.cu (see cuda_sim.h).
#include "cuda_sim.h"

#include "../rowwise_fast_bwd.cu"
