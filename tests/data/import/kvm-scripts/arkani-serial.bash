KERNEL=2.6.26-1-amd64
NAME=arkani
kvm -smp 2 \
-drive if=ide,file=/dev/internal/kvm_guest,boot=on \
-m 1024 \
-nographic \
-daemonize \
-name ${NAME} \
-kernel /boot/kvm/${NAME}/vmlinuz-${KERNEL} \
-initrd /boot/kvm/${NAME}/initrd.img-${KERNEL} \
-append "root=/dev/hda ro console=ttyS0,115200" \
-serial mon:unix:/etc/kvm/soles/${NAME}.sock,server,nowait
