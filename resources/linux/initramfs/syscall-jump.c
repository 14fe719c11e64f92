/*
 * syscall-jump ENTRY: checks that the guest kernel's ring-3 syscall completion
 * (resources/linux/patches/0001-*.patch) cannot be abused. It jumps to the
 * kernel's syscall entry address ENTRY (entry_SYSCALL_64 from System.map, in
 * hex) from user mode, the way any process can, with a chosen RCX (return
 * address) and R11 (flags, here with IOPL=3, NT and other privileged bits set),
 * and reports what it got:
 *
 *   SYSJUMP getpid ret=<rax> real=<getpid()>      the call ran as getpid
 *   SYSJUMP flags=<rflags after return> iopl=<0..3> nt=<0|1> if=<0|1>
 *   SYSJUMP traced flags=<pt_regs flags> iopl=<0..3> nt=<0|1>
 *        the same jump in a child stopped at the system-call entry under
 *        ptrace: the flags the kernel will load with IRET. (Some hosts'
 *        IRET emulation drops IOPL/NT on the way out, so the flags after
 *        return alone cannot show a leak there; the saved frame can.)
 *   SYSJUMP port 0x80: refused (SIGSEGV) | ALLOWED
 *   SYSJUMP enosys ret=<rax>                        an unknown number: -ENOSYS (-38)
 *   SYSJUMP bad rcx <addr>: SIGSEGV | SIGBUS | returned
 *   SYSJUMP done
 *
 * Without the completion (a host that runs SYSCALL normally, or the switch
 * off) the jump is an ordinary user-mode fault at a kernel address and the
 * first probe prints "SYSJUMP getpid: SIGSEGV" instead. Exit status 0 when
 * every probe ran (the verdict is the caller's), 2 on a usage error.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

static sigjmp_buf back;
static volatile sig_atomic_t last_sig;

static void on_signal(int sig)
{
	last_sig = sig;
	siglongjmp(back, 1);
}

/* Jump to `entry` with RAX = nr, RCX = ret (0: the instruction after the
 * jump), R11 = r11; returns RAX and the flags seen right after the return. */
static long jump(unsigned long entry, long nr, unsigned long ret, unsigned long r11,
		 unsigned long *flags)
{
	long rax = nr;
	unsigned long fl = 0;
	if (ret == 0) {
		__asm__ volatile("lea 1f(%%rip), %%rcx\n\t"
				 "mov %[r11], %%r11\n\t"
				 "jmp *%[entry]\n"
				 "1:\n\t"
				 "pushfq\n\t"
				 "pop %[fl]\n\t"
				 : "+a"(rax), [fl] "=r"(fl)
				 : [entry] "r"(entry), [r11] "r"(r11)
				 : "rcx", "r11", "memory", "cc");
	} else {
		__asm__ volatile("mov %[ret], %%rcx\n\t"
				 "mov %[r11], %%r11\n\t"
				 "jmp *%[entry]\n\t"
				 : "+a"(rax)
				 : [entry] "r"(entry), [r11] "r"(r11), [ret] "r"(ret)
				 : "rcx", "r11", "memory", "cc");
	}
	if (flags)
		*flags = fl;
	return rax;
}

/* Run the jump in a traced child and print the frame's flags at the
 * getpid entry stop. */
static void traced_flags(unsigned long entry, unsigned long r11)
{
	pid_t c = fork();
	if (c == 0) {
		signal(SIGSEGV, SIG_DFL);
		ptrace(PTRACE_TRACEME, 0, 0, 0);
		raise(SIGSTOP);
		jump(entry, 39 /* getpid */, 0, r11, NULL);
		_exit(0);
	}
	int st;
	if (c < 0 || waitpid(c, &st, 0) != c || !WIFSTOPPED(st)) {
		printf("SYSJUMP traced: no stopped child\n");
		return;
	}
	int found = 0;
	for (int i = 0; i < 40 && !found; i++) {
		if (ptrace(PTRACE_SYSCALL, c, 0, 0) != 0 || waitpid(c, &st, 0) != c || !WIFSTOPPED(st))
			break;
		struct user_regs_struct r;
		if (ptrace(PTRACE_GETREGS, c, 0, &r) == 0 && r.orig_rax == 39) {
			printf("SYSJUMP traced flags=%#llx iopl=%llu nt=%llu\n",
			       (unsigned long long)r.eflags, (unsigned long long)(r.eflags >> 12) & 3,
			       (unsigned long long)(r.eflags >> 14) & 1);
			found = 1;
		}
	}
	if (found) {
		ptrace(PTRACE_DETACH, c, 0, 0);
	} else {
		printf("SYSJUMP traced: no getpid stop\n");
		kill(c, SIGKILL);
	}
	waitpid(c, &st, 0);
}

static const char *signame(int s)
{
	return s == SIGSEGV ? "SIGSEGV" : s == SIGBUS ? "SIGBUS" : s == SIGILL ? "SIGILL" : "signal";
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: syscall-jump ENTRY_SYSCALL_64_HEX\n");
		return 2;
	}
	unsigned long entry = strtoul(argv[1], NULL, 16);
	setvbuf(stdout, NULL, _IONBF, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sa.sa_flags = SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	sigaction(SIGILL, &sa, NULL);

	/* IOPL=3 (0x3000), NT (0x4000), VM (0x20000), VIF|VIP, ID, AC, TF off, plus CF. */
	const unsigned long evil = 0x3000 | 0x4000 | 0x20000 | 0x80000 | 0x100000 | 0x1;
	unsigned long fl = 0;
	if (sigsetjmp(back, 1) == 0) {
		long r = jump(entry, 39 /* getpid */, 0, evil, &fl);
		printf("SYSJUMP getpid ret=%ld real=%d\n", r, getpid());
		printf("SYSJUMP flags=%#lx iopl=%lu nt=%lu if=%lu\n", fl, (fl >> 12) & 3,
		       (fl >> 14) & 1, (fl >> 9) & 1);
	} else {
		printf("SYSJUMP getpid: %s\n", signame(last_sig));
	}

	traced_flags(entry, evil);

	if (sigsetjmp(back, 1) == 0) {
		unsigned char v;
		__asm__ volatile("inb $0x80, %0" : "=a"(v));
		printf("SYSJUMP port 0x80: ALLOWED (read %#x)\n", v);
	} else {
		printf("SYSJUMP port 0x80: refused (%s)\n", signame(last_sig));
	}

	if (sigsetjmp(back, 1) == 0) {
		long r = jump(entry, 100000, 0, 0x202, NULL);
		printf("SYSJUMP enosys ret=%ld\n", r);
	} else {
		printf("SYSJUMP enosys: %s\n", signame(last_sig));
	}

	const unsigned long bad[] = { 0x8000000000000000ul, 0xffffffff81000000ul, 0 };
	for (volatile int i = 0; bad[i]; i++) {
		if (sigsetjmp(back, 1) == 0) {
			jump(entry, 39, bad[i], 0x202, NULL);
			printf("SYSJUMP bad rcx %#lx: returned\n", bad[i]);
		} else {
			printf("SYSJUMP bad rcx %#lx: %s\n", bad[i], signame(last_sig));
		}
	}
	printf("SYSJUMP done\n");
	return 0;
}
