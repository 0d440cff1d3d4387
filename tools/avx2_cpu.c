// tools/avx2_cpu.c: make this process, and every process it starts, see a CPU without AVX-512
// (hand-written plumbing for `make test-avx2`, not part of the book).
//
// Most students' laptops and GitHub's hosted runners have AVX2 but no AVX-512 and no native bf16.
// On such a CPU torch and oneDNN dispatch to other kernels (a bf16 matmul is ~70x slower than
// fp32), bitsandbytes takes another CPU path, and `g++ -march=native` builds our CPU twin without
// its AVX-512 loop. Environment caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) reach only torch
// and oneDNN; bitsandbytes and the compiler ask the CPU itself, with the CPUID instruction.
//
// So, loaded with LD_PRELOAD, this library turns on Linux's CPUID faulting
// (arch_prctl(ARCH_SET_CPUID, 0), on Intel CPUs that have it, including under KVM): every CPUID
// then traps (SIGSEGV), and the handler runs the real CPUID, clears the AVX-512, AMX and
// AVX-VNNI/AVX512-BF16 bits, and returns as if the instruction had run. XCR0 (XGETBV) is left
// alone: callers test the CPUID bits first. What ran before this library's constructor (the
// dynamic loader's own choice of memcpy) keeps the real CPU's answer; it computes the same bytes.
//
// The program's own SIGSEGV handlers (Python's faulthandler, under pytest) are kept: sigaction()
// and signal() are wrapped so that this handler stays installed and passes every other SIGSEGV on.
// Execve resets CPUID faulting; LD_PRELOAD stays in the environment, so children load this again.
// Without CPUID faulting (AMD CPUs, some hypervisors) the library does nothing: silently where the
// CPU has no AVX-512 to hide (it is already what `make test-avx2` presents), with one line on
// stderr where it has (the Makefile's first check then stops the run).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef int (*sigaction_fn)(int, const struct sigaction*, struct sigaction*);

static struct sigaction app_action;  // what the program asked for SIGSEGV (default: SIG_DFL)
static int active;                   // CPUID faulting is on in this process

static sigaction_fn real_sigaction(void) {
    static sigaction_fn fn;
    if (!fn) fn = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return fn;
}

static void masked_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);  // CPUID may run again, for this one call
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) |
                  (1u << 30) | (1u << 31));   // EBX: AVX512 F DQ IFMA PF ER CD BW VL
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));  // ECX: VBMI
        //   VBMI2 VNNI BITALG VPOPCNTDQ
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) |
                  (1u << 25));  // EDX: 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 AVX512-FP16 AMX-TILE AMX-INT8
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~((1u << 4) | (1u << 5));  // EAX: AVX-VNNI, AVX512-BF16
    } else if (leaf == 0xD && sub == 0) {
        r[0] &= ~(7u << 5);  // the XSAVE components of AVX-512 (opmask, ZMM_Hi256, Hi16_ZMM)
    }
}

static void on_segv(int sig, siginfo_t* info, void* context) {
    ucontext_t* uc = (ucontext_t*)context;
    const uint8_t* ip = (const uint8_t*)uc->uc_mcontext.gregs[REG_RIP];
    if (active && info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {  // CPUID
        uint32_t r[4];
        masked_cpuid((uint32_t)uc->uc_mcontext.gregs[REG_RAX],
                     (uint32_t)uc->uc_mcontext.gregs[REG_RCX], r);
        uc->uc_mcontext.gregs[REG_RAX] = r[0];
        uc->uc_mcontext.gregs[REG_RBX] = r[1];
        uc->uc_mcontext.gregs[REG_RCX] = r[2];
        uc->uc_mcontext.gregs[REG_RDX] = r[3];
        uc->uc_mcontext.gregs[REG_RIP] += 2;
        return;
    }
    if (app_action.sa_flags & SA_SIGINFO) {  // a real fault: the program's handler, or the default
        if (app_action.sa_sigaction) app_action.sa_sigaction(sig, info, context);
        return;
    }
    if (app_action.sa_handler == SIG_IGN) return;
    if (app_action.sa_handler != SIG_DFL) {
        app_action.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &dfl, NULL);  // returning re-runs the faulting instruction: it dies
}

int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
    if (sig != SIGSEGV || !active) return real_sigaction()(sig, act, old);
    if (old) *old = app_action;
    if (act) app_action = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
    return old.sa_handler;
}

__attribute__((constructor)) static void start(void) {
    memset(&app_action, 0, sizeof app_action);
    app_action.sa_handler = SIG_DFL;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (real_sigaction()(SIGSEGV, &sa, NULL) != 0) return;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) == 0) {
        active = 1;
        return;
    }
    uint32_t r[4];  // no CPUID faulting: say so only where there is AVX-512 to hide (EBX bit 16)
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(7), "c"(0));
    if (r[1] & (1u << 16)) {
        static const char msg[] = "avx2_cpu: this CPU or kernel has no CPUID faulting; "
                                  "the process sees the real CPU, AVX-512 included\n";
        (void)!write(2, msg, sizeof msg - 1);
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    real_sigaction()(SIGSEGV, &sa, NULL);
}
