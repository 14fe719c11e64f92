/*
 * /init of the vmm test initramfs: mounts the pseudo file systems, prints the
 * boot report the tests wait for, runs a busybox shell on the serial console
 * with the prompt "vmm-guest# " and resets the VM (i8042, reboot=k) when the
 * shell exits.
 *
 * Written in C rather than as a shell script because on hosts whose KVM
 * emulates guest ring 0 every fork+exec costs ~0.7-1 s of emulated kernel
 * work: a script that runs mount five times plus a report built from cat,
 * awk and grep took ~12 s from "Run /init" to the prompt; this program execs
 * once (the shell). `guest-report` prints the full report on demand.
 *
 * Output (one line each):
 *   VMM-GUEST init: Linux <release>, cmdline: <kernel command line>
 *   VMM-GUEST vcpus: nproc=<online CPUs> online=<cpu list>
 *   VMM-GUEST ready
 * then the shell. As PID 1 it also reaps orphans.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(const char *fmt, const char *a, const char *b)
{
	char line[4096];
	int n = snprintf(line, sizeof(line), fmt, a, b);
	if (n > 0)
		(void)!write(1, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

/* The first line of `path` without its newline ("?" when unreadable). */
static void first_line(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, len - 1);
	if (fd >= 0)
		close(fd);
	if (n <= 0) {
		snprintf(buf, len, "?");
		return;
	}
	buf[n] = 0;
	buf[strcspn(buf, "\n")] = 0;
}

static void mount_or_say(const char *src, const char *dir, const char *type)
{
	mkdir(dir, 0755);
	if (mount(src, dir, type, 0, NULL) != 0 && errno != EBUSY)
		say("VMM-GUEST init: mount %s: %s\n", dir, strerror(errno));
}

static void reset_vm(void)
{
	say("%s%s", "VMM-GUEST shell exited; resetting the VM\n", "");
	sync();
	reboot(RB_AUTOBOOT);
	say("VMM-GUEST reboot failed: %s%s\n", strerror(errno), "");
	for (;;)
		pause();
}

int main(void)
{
	char cmdline[2048], online[256], nproc[16];
	struct utsname u;

	mount_or_say("proc", "/proc", "proc");
	mount_or_say("sysfs", "/sys", "sysfs");
	mount_or_say("devtmpfs", "/dev", "devtmpfs");
	mount_or_say("tmpfs", "/tmp", "tmpfs");
	mount_or_say("debugfs", "/sys/kernel/debug", "debugfs");

	uname(&u);
	first_line("/proc/cmdline", cmdline, sizeof(cmdline));
	say("VMM-GUEST init: Linux %s, cmdline: %s\n", u.release, cmdline);
	first_line("/sys/devices/system/cpu/online", online, sizeof(online));
	snprintf(nproc, sizeof(nproc), "%ld", sysconf(_SC_NPROCESSORS_ONLN));
	say("VMM-GUEST vcpus: nproc=%s online=%s\n", nproc, online);
	say("%s%s", "VMM-GUEST ready\n", "");

	setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin", 1);
	setenv("PS1", "vmm-guest# ", 1);
	setenv("HOME", "/root", 1);
	setenv("ENV", "/etc/shrc", 1);
	setenv("TERM", "vt100", 0);
	if (chdir("/root") != 0)
		say("VMM-GUEST init: chdir /root: %s%s\n", strerror(errno), "");

	pid_t shell = fork();
	if (shell < 0) {
		say("VMM-GUEST init: fork: %s%s\n", strerror(errno), "");
		reset_vm();
	}
	if (shell == 0) {
		/* A session of its own with the serial port as controlling
		 * terminal (job control, ^C), as busybox's cttyhack does. */
		setsid();
		int fd = open("/dev/ttyS0", O_RDWR);
		if (fd >= 0) {
			ioctl(fd, TIOCSCTTY, 1);
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
			if (fd > 2)
				close(fd);
		}
		execl("/bin/sh", "sh", (char *)NULL);
		say("VMM-GUEST init: exec /bin/sh: %s%s\n", strerror(errno), "");
		_exit(127);
	}
	for (;;) {
		int status;
		pid_t p = wait(&status);
		if (p == shell || (p < 0 && errno == ECHILD))
			break;
	}
	reset_vm();
	return 0;
}
