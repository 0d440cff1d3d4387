// Hand-written: declarations shared by paged_alloc.cu (CUDA runtime) and paged_alloc.cpp (torch).
#pragma once
#include <cstddef>
#include <string>

namespace qlora_mini {
std::string managed_alloc(void** ptr, size_t nbytes);
void managed_free(void* ptr);
std::string managed_prefetch(void* ptr, size_t nbytes, int device, void* stream);
}  // namespace qlora_mini
