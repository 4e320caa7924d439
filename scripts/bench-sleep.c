/* A `sleep SECONDS` with no libc start-up work: built statically against musl
 * (`musl-gcc -static -O2 -o msleep scripts/bench-sleep.c`), it starts without
 * glibc's CPU-feature and cache detection, whose dozens of `cpuid`
 * instructions each trap to the hypervisor on a VM (8 us each on the
 * development machine: about 0.6 ms of CPU per process start). `bench-host
 * --program ./msleep` then shows how much of a start is the program's own
 * start-up rather than agentplane's. */
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    struct timespec t = {argc > 1 ? atol(argv[1]) : 0, 0};
    while (nanosleep(&t, &t) != 0) {
    }
    return 0;
}
