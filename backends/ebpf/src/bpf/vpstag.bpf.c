// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * vpstag's kernel side: a table tgid -> (VPS id, start time) that follows every fork of a tagged
 * process before the child runs, and notifications of fork/exec/exit of tagged processes.
 *
 * - tags:     hash map, key tgid (__u32), value struct vpstag_tag. User space seeds a VPS's first
 *             process (and loader members); sched_process_fork copies the parent's entry to a new
 *             process; sched_process_exit deletes it once the whole thread group is dead.
 * - counters: one struct vpstag_counters: insertions that failed (map full) and notifications
 *             that found the ring buffer full. Never silent: user space reports growth as Lost.
 * - control:  one struct vpstag_control, written by user space: what to report (every event of
 *             a tagged process, or only roots' exits and losses) and how to wake the reader.
 * - events:   ring buffer of struct vpstag_event, only for tagged processes.
 *
 * Wake-ups: waking the reader costs an irq_work (a self-IPI) and a thread wake-up, per record
 * when the reader keeps up. With control.wakeup_ns set, a record is submitted with
 * BPF_RB_NO_WAKEUP unless the last forced wake-up is older than wakeup_ns (so an isolated event
 * still wakes the reader at once, and a burst at most once per wakeup_ns), the ring holds more
 * than control.wake_bytes unread, or the record is urgent (a loss, a root's exit). A reader that
 * consumes without waiting sees every record either way.
 *
 * Kernel memory is read only with direct (CO-RE relocated) loads from the tp_btf arguments, never
 * with bpf_probe_read_kernel, which kernel lockdown may refuse.
 */
#include "vmlinux_min.h"
#include <bpf/bpf_helpers.h>
#include "vpstag.h"

/* GPL-compatible, as tracing programs require; the user-space crate is MIT OR Apache-2.0. */
char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* user space sets Config::map_entries before loading */
	__type(key, __u32);
	__type(value, struct vpstag_tag);
} tags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vpstag_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vpstag_control);
} control SEC(".maps");

/* bpf_ktime_get_boot_ns() of the last forced wake-up. CPUs race on it without harm: the worst
 * case is one extra wake-up. */
__u64 last_wakeup_ns = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* user space sets Config::ring_bytes before loading */
} events SEC(".maps");

static __always_inline struct vpstag_counters *the_counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&counters, &zero);
}

static __always_inline struct vpstag_control *the_control(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&control, &zero);
}

static __always_inline bool roots_only(const struct vpstag_control *ctl)
{
	return ctl && ctl->reporting == VPSTAG_REPORT_ROOTS;
}

/* The flags to submit a record with, made at `now`; `urgent` records always wake the reader. */
static __always_inline __u64 wake_flags(const struct vpstag_control *ctl, __u64 now, bool urgent)
{
	__u64 last;

	if (!ctl || !ctl->wakeup_ns)
		return 0;
	if (!urgent) {
		last = *(volatile __u64 *)&last_wakeup_ns;
		if (now < last + ctl->wakeup_ns && bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) < ctl->wake_bytes)
			return BPF_RB_NO_WAKEUP;
	}
	*(volatile __u64 *)&last_wakeup_ns = now;
	return BPF_RB_FORCE_WAKEUP;
}

/* Reserves a record and fills the common fields; counts a full ring buffer. */
static __always_inline struct vpstag_event *reserve(__u32 kind, __u64 vps)
{
	struct vpstag_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	struct vpstag_counters *c;

	if (!e) {
		c = the_counters();
		if (c)
			__sync_fetch_and_add(&c->ringbuf_full, 1);
		return 0;
	}
	e->time_ns = bpf_ktime_get_boot_ns();
	e->vps = vps;
	e->start_ns = 0;
	e->kind = kind;
	e->cpu = bpf_get_smp_processor_id();
	e->pid = 0;
	e->tid = 0;
	e->child = 0;
	e->status = 0;
	e->flags = 0;
	e->pad = 0;
	e->cpu_ns = 0;
	return e;
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child): parent is the caller
 * (current). It fires in kernel_clone() before wake_up_new_task(): the child has not run yet. */
SEC("tp_btf/sched_process_fork")
int vpstag_fork(__u64 *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx[0];
	struct task_struct *child = (struct task_struct *)ctx[1];
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	struct vpstag_tag *pt, t;
	struct vpstag_event *e;
	struct vpstag_counters *c;
	struct vpstag_control *ctl;
	__u32 flags = 0;

	/* A new thread shares its process's tgid, and so its entry: nothing to do. */
	if (ptgid == ctgid)
		return 0;
	pt = bpf_map_lookup_elem(&tags, &ptgid);
	if (!pt)
		return 0;
	t.vps = pt->vps;
	t.start_ns = child->start_boottime;
	t.flags = 0; /* a root's child is no root */
	t.pad = 0;
	if (bpf_map_update_elem(&tags, &ctgid, &t, BPF_ANY)) {
		c = the_counters();
		if (c)
			__sync_fetch_and_add(&c->insert_failed, 1);
		flags = VPSTAG_F_UNTRACKED;
	}

	ctl = the_control();
	/* Only a loss is reported in roots-only mode. */
	if (!flags && roots_only(ctl))
		return 0;
	e = reserve(VPSTAG_FORK, t.vps);
	if (!e)
		return 0;
	e->start_ns = t.start_ns;
	e->pid = child->real_parent->tgid; /* the caller's parent for CLONE_PARENT */
	e->tid = child->pid;
	e->child = ctgid;
	e->flags = flags;
	bpf_ringbuf_submit(e, wake_flags(ctl, e->time_ns, flags != 0));
	return 0;
}

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm): after
 * de_thread(), so p is the thread-group leader again; old_pid is the thread that called execve. */
SEC("tp_btf/sched_process_exec")
int vpstag_exec(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	__s32 old_pid = (__s32)ctx[1];
	__u32 tgid = p->tgid;
	struct vpstag_tag *t;
	struct vpstag_event *e;
	struct vpstag_control *ctl = the_control();

	if (roots_only(ctl))
		return 0;
	t = bpf_map_lookup_elem(&tags, &tgid);
	if (!t)
		return 0;
	e = reserve(VPSTAG_EXEC, t->vps);
	if (!e)
		return 0;
	e->pid = tgid;
	e->tid = old_pid;
	bpf_ringbuf_submit(e, wake_flags(ctl, e->time_ns, 0));
	return 0;
}

/*
 * The CPU time, in ns, of the process whose last live thread p is, at its exit: what
 * /proc/PID/stat's utime + stime + cutime + cstime would show, read before anyone can reap it.
 *
 * sched_process_exit fires in do_exit() before exit_notify(), so nothing of the group has been
 * reaped yet, and:
 * - signal->sum_sched_runtime holds the run time of the group's threads already released
 *   (__exit_signal() adds a non-leader thread's se.sum_exec_runtime there in release_task(),
 *   after its exit_notify(); never the leader's);
 * - p's own time is still on p (p->se.sum_exec_runtime), and so is the leader's when p is another
 *   thread (a leader is never added to signal, it stays a zombie until the group is reaped);
 * - signal->cutime and cstime hold the children this process waited for (wait_task_zombie()
 *   adds each one's thread_group_cputime_adjusted() and its own cutime/cstime), in ns.
 *
 * Run time (sum_exec_runtime, exact ns from the scheduler) rather than signal->utime/stime and
 * the tasks' utime/stime: with tick-based accounting those are tick samples, and /proc scales
 * them so that utime + stime equals the run time (cputime_adjust()); the run time is what /proc
 * shows, unrounded. It lags by p's run since the scheduler last updated it (at most one tick).
 * Not counted: another thread of the group still exiting at this instant (it has left `live`
 * but not yet reached release_task(): its run time is on it, out of reach without walking the
 * thread list), and what every thread spends in the rest of do_exit() (microseconds).
 */
static __always_inline __u64 group_cpu_ns(struct task_struct *p, struct signal_struct *sig)
{
	struct task_struct *leader = p->group_leader;
	__u64 ns = sig->sum_sched_runtime + p->se.sum_exec_runtime + sig->cutime + sig->cstime;

	if (leader != p)
		ns += leader->se.sum_exec_runtime;
	return ns;
}

/* sched_process_exit(struct task_struct *p[, bool group_dead]): in do_exit(), for every thread,
 * after signal->live was decremented. The entry goes only when the whole group is dead, so a
 * zombie leader whose other threads live on keeps its tag. When two last threads race, both may
 * see live == 0: only the one whose delete succeeds reports the exit. */
SEC("tp_btf/sched_process_exit")
int vpstag_exit(__u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	struct signal_struct *sig = p->signal;
	__u32 tgid;
	struct vpstag_tag *t;
	struct vpstag_event *e;
	struct vpstag_control *ctl;
	__u64 vps;
	bool root;
	int status;

	if (*(volatile int *)&sig->live.counter != 0)
		return 0;
	tgid = p->tgid;
	t = bpf_map_lookup_elem(&tags, &tgid);
	if (!t)
		return 0;
	vps = t->vps;
	root = t->flags & VPSTAG_TAG_ROOT;
	if (bpf_map_delete_elem(&tags, &tgid))
		return 0;
	ctl = the_control();
	if (!root && roots_only(ctl))
		return 0;

	/* What wait(2) will report: the group exit code, else the leader's own. */
	if (sig->flags & SIGNAL_GROUP_EXIT)
		status = sig->group_exit_code;
	else
		status = p->group_leader->exit_code;

	e = reserve(VPSTAG_EXIT, vps);
	if (!e)
		return 0;
	e->pid = tgid;
	e->tid = p->pid;
	e->status = status;
	e->flags = VPSTAG_F_CPU | (root ? VPSTAG_F_ROOT : 0);
	e->cpu_ns = group_cpu_ns(p, sig);
	/* A root's exit is urgent: user space may be waiting for it alone. */
	bpf_ringbuf_submit(e, wake_flags(ctl, e->time_ns, root));
	return 0;
}
