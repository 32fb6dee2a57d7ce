// The CUDA simulator's device process (a test double). Built with AddressSanitizer, it maps the
// simulated device memory (files the Python side also maps), loads kernels compiled from .cu
// sources (sim_cuda.h) and runs launches sent on stdin, one command a line, answering each on
// stdout with "ok ..." or "err ...". Every allocation sits between poisoned guard bytes and
// inaccessible pages, so a kernel that reads or writes outside its buffers ends this process
// with AddressSanitizer's report on stderr: the launch fails, as an illegal address does on a GPU.
//
//   map ID PATH DATA_BYTES GUARD_BYTES   the file holds GUARD + DATA + GUARD bytes
//   unmap ID
//   load PATH                            answers "ok HANDLE"
//   launch HANDLE ENTRY GX GY GZ BX BY BZ N ARG...   ARG: "p ID BYTE_OFFSET" or "i VALUE"
#include <dlfcn.h>
#include <fcntl.h>
#include <sanitizer/asan_interface.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr size_t FENCE_BYTES = 1 << 16;  // inaccessible pages on either side of every allocation

struct Allocation {
    char* reserved = nullptr;  // fence + file + fence
    size_t reserved_bytes = 0;
    char* data = nullptr;
    size_t data_bytes = 0;
};

std::map<long, Allocation> allocations;
std::vector<void*> libraries;

size_t page_rounded(size_t n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
}

std::string map_allocation(long id, const std::string& path, size_t data_bytes, size_t guard_bytes) {
    const size_t file_bytes = data_bytes + 2 * guard_bytes;
    const size_t mapped_bytes = page_rounded(file_bytes);
    const size_t reserved_bytes = FENCE_BYTES + mapped_bytes + FENCE_BYTES;
    void* reserved = mmap(nullptr, reserved_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserved == MAP_FAILED) return "err cannot reserve address space";
    const int fd = open(path.c_str(), O_RDWR);
    if (fd < 0) return "err cannot open " + path;
    char* base = static_cast<char*>(reserved) + FENCE_BYTES;
    void* mapped = mmap(base, file_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    close(fd);
    if (mapped == MAP_FAILED) return "err cannot map " + path;
    // Bytes of the mapped pages outside the data are poisoned: any access there is reported.
    ASAN_POISON_MEMORY_REGION(base, guard_bytes);
    ASAN_POISON_MEMORY_REGION(base + guard_bytes + data_bytes, mapped_bytes - guard_bytes - data_bytes);
    allocations[id] = Allocation{static_cast<char*>(reserved), reserved_bytes, base + guard_bytes, data_bytes};
    return "ok";
}

std::string unmap_allocation(long id) {
    auto found = allocations.find(id);
    if (found == allocations.end()) return "err no allocation " + std::to_string(id);
    ASAN_UNPOISON_MEMORY_REGION(found->second.reserved + FENCE_BYTES, found->second.reserved_bytes - 2 * FENCE_BYTES);
    munmap(found->second.reserved, found->second.reserved_bytes);
    allocations.erase(found);
    return "ok";
}

std::string load_library(const std::string& path) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) return std::string("err ") + dlerror();
    libraries.push_back(handle);
    return "ok " + std::to_string(libraries.size() - 1);
}

std::string launch(std::istringstream& in) {
    size_t handle = 0;
    std::string entry;
    unsigned grid[3], block[3];
    size_t count = 0;
    in >> handle >> entry >> grid[0] >> grid[1] >> grid[2] >> block[0] >> block[1] >> block[2] >> count;
    if (!in || handle >= libraries.size()) return "err malformed launch";
    using Launch = int (*)(const unsigned*, const unsigned*, void**);
    using Signature = const char* (*)();
    auto run = reinterpret_cast<Launch>(dlsym(libraries[handle], ("sim_launch_" + entry).c_str()));
    auto signature = reinterpret_cast<Signature>(dlsym(libraries[handle], ("sim_signature_" + entry).c_str()));
    if (run == nullptr || signature == nullptr) return "err no kernel named " + entry;
    const std::string kinds = signature();
    if (kinds.size() != count)
        return "err " + entry + " takes " + std::to_string(kinds.size()) + " arguments, " + std::to_string(count) +
               " given";
    std::vector<void*> pointers(count, nullptr);
    std::vector<int> ints(count, 0);
    std::vector<void*> args(count, nullptr);
    for (size_t i = 0; i < count; ++i) {
        std::string kind;
        in >> kind;
        if (kind == "p") {
            long id = 0;
            size_t offset = 0;
            in >> id >> offset;
            auto found = allocations.find(id);
            if (found == allocations.end() || offset > found->second.data_bytes)
                return "err argument " + std::to_string(i) + " is not a live device pointer";
            pointers[i] = found->second.data + offset;
            args[i] = &pointers[i];
        } else if (kind == "i") {
            in >> ints[i];
            args[i] = &ints[i];
        } else {
            return "err malformed argument " + std::to_string(i);
        }
        if (kinds[i] != kind[0])
            return "err argument " + std::to_string(i) + " of " + entry + " must be " +
                   (kinds[i] == 'p' ? "a pointer" : "an int");
    }
    if (!in) return "err malformed launch";
    switch (run(grid, block, args.data())) {
        case 0: return "ok";
        case 1: return "err invalid configuration: a block of 1 to 1024 threads and a non-empty grid";
        default: return "err OpenMP gave a team smaller than the block";
    }
}

}  // namespace

int main() {
    std::ios::sync_with_stdio(false);
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string command;
        in >> command;
        std::string answer;
        if (command == "map") {
            long id = 0;
            std::string path;
            size_t data_bytes = 0, guard_bytes = 0;
            in >> id >> path >> data_bytes >> guard_bytes;
            answer = in ? map_allocation(id, path, data_bytes, guard_bytes) : "err malformed map";
        } else if (command == "unmap") {
            long id = 0;
            in >> id;
            answer = unmap_allocation(id);
        } else if (command == "load") {
            std::string path;
            in >> path;
            answer = load_library(path);
        } else if (command == "launch") {
            answer = launch(in);
        } else {
            answer = "err unknown command " + command;
        }
        std::cout << answer << '\n' << std::flush;
    }
    return 0;
}
