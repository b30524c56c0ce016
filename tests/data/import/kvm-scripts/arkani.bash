KERNEL=2.6.26-1-amd64
NAME=arkani
kvm -smp 2 \
-drive if=ide,file=/dev/internal/kvm_guest,boot=on \
-m 1024 \
-daemonize \
-name ${NAME} \
-kernel /boot/kvm/${NAME}/vmlinuz-${KERNEL} \
-initrd /boot/kvm/${NAME}/initrd.img-${KERNEL} \
-append "root=/dev/hda ro"
