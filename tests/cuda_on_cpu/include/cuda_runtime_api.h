// CUDA-on-CPU test layer: stands in for the CUDA runtime header (see rmk_emu/emu.h).
#pragma once
#include "rmk_emu/emu.h"
